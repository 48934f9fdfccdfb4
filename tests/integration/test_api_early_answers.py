"""An answer given before the body is read reaches an ordinary client: a real api.

The 413 for a declared length past MAX_BODY_BYTES and the 401 of the key gate are
decided from the head alone. Answering and closing while the client still sends made
the kernel reset the connection under data it had not read, and a client such as
``urllib`` saw ``BrokenPipeError``/``ConnectionResetError`` instead of the problem
document. The api now reads and discards a bounded amount of the body first.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from tests.integration.test_api_connection_limits import api_env, running_api

__all__ = ["api_env"]  # the fixture, imported for pytest to find

KEY = "early-answers-key-0123456789"
BODY = b'{"type": "echo", "payload": {"blob": "' + b"x" * (2 * 1024 * 1024) + b'"}}'
TRIES = 60  # the reset is intermittent: enough tries that the old code fails each run


def post(port: int, key: str) -> tuple[int, dict[str, object]]:
    """POST the 2 MiB body with urllib; the status and problem document it gets back."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/tasks",
        data=BODY,
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize(
    ("key", "expected"),
    [(KEY, 413), ("not-the-key", 401)],
    ids=["too-large", "unauthenticated"],
)
async def test_urllib_gets_the_problem_document_of_an_early_answer(
    api_env: dict[str, str], key: str, expected: int
) -> None:
    async with running_api(api_env, API_KEYS=KEY) as api:
        for attempt in range(TRIES):
            # A BrokenPipeError or ConnectionResetError here is the bug.
            code, document = await asyncio.to_thread(post, api.port, key)
            assert code == expected, (attempt, code, document)
            assert document["status"] == expected, document
