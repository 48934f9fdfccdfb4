"""X-Request-ID: on every response, in every problem document, on the request's log lines.

In-process over the real Postgres, like the other API tests.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from taskbox.api.app import create_app
from taskbox.api.settings import ApiSettings
from taskbox.runtime.logs import TaskContextFilter
from tests.integration.conftest import app_client_for
from tests.integration.test_api_security import bearer, settings_with
from tests.integration.test_api_tasks import INTERNALS, TASKS, assert_problem

GENERATED = re.compile(r"[0-9a-f]{32}")
MISSING_TASK = f"{TASKS}/{uuid.UUID(int=7)}"


def request_id_of(response: httpx.Response) -> str:
    request_id = response.headers["x-request-id"]
    assert isinstance(request_id, str)
    return request_id


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", TASKS)],
)
async def test_every_response_gets_a_new_id(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    first = await client.request(method, path)
    second = await client.request(method, path)
    assert first.status_code == second.status_code == 200, first.text
    assert GENERATED.fullmatch(request_id_of(first)), first.headers
    assert GENERATED.fullmatch(request_id_of(second)), second.headers
    assert request_id_of(first) != request_id_of(second)


@pytest.mark.parametrize(
    "sent",
    [
        "abc",
        "0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11",
        "Root=1-67891233-abcdef012345678912345678",
        "svc.web:42/retry+1_x",
        "r" * 128,
    ],
)
async def test_a_well_formed_client_id_is_kept(client: httpx.AsyncClient, sent: str) -> None:
    response = await client.get(MISSING_TASK, headers={"X-Request-ID": sent})
    problem = assert_problem(response, 404)
    assert request_id_of(response) == sent
    assert problem["request_id"] == sent


@pytest.mark.parametrize(
    "sent",
    [
        b"",
        b"r" * 129,  # too long
        b"two words",
        b'quote"d',
        b"semi;colon",
        b"caf\xc3\xa9",  # not ASCII
        b"<script>",
    ],
)
async def test_a_malformed_client_id_is_replaced_not_echoed(
    client: httpx.AsyncClient, sent: bytes
) -> None:
    response = await client.get(MISSING_TASK, headers={b"X-Request-ID": sent})
    problem = assert_problem(response, 404)
    assert GENERATED.fullmatch(request_id_of(response)), response.headers
    assert problem["request_id"] == request_id_of(response)
    assert request_id_of(response) != sent.decode("latin-1")


async def test_problem_documents_carry_the_id_of_their_request(
    api_settings: ApiSettings,
) -> None:
    settings = settings_with(api_settings, api_keys="k1", max_body_bytes=64)
    async with app_client_for(settings) as client:
        authorized = bearer("k1")
        json_body = {**authorized, "Content-Type": "application/json"}
        answers = {
            401: await client.get(TASKS),
            404: await client.get(MISSING_TASK, headers=authorized),
            405: await client.put(TASKS, headers=authorized),
            413: await client.post(TASKS, content=b"x" * 65, headers=json_body),
            415: await client.post(TASKS, content=b"{}", headers=authorized),
            422: await client.post(TASKS, content=b"{", headers=json_body),
        }
    ids = set()
    for status, response in answers.items():
        problem = assert_problem(response, status)
        assert problem["request_id"] == request_id_of(response), (status, problem)
        ids.add(problem["request_id"])
    assert len(ids) == len(answers)


@pytest.fixture
async def failing_app(
    api_settings: ApiSettings, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[httpx.AsyncClient]:
    """An app whose task lookups raise an unexpected error that names internals, and
    log a line of their own first (as a handler deep in the stack would)."""

    class Broken:
        async def get(self, task_id: uuid.UUID) -> Any:
            logging.getLogger("tests.broken").info("looking up %s", task_id)
            raise RuntimeError("SELECT * FROM tasks at postgresql://root:secret@127.0.0.1/x")

    # caplog's handler is not the one runtime.logs.configure sets up; give it the filter.
    caplog.handler.addFilter(TaskContextFilter())
    caplog.set_level(logging.INFO)
    app = create_app(api_settings)
    async with app.router.lifespan_context(app):
        app.state.service = Broken()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_a_500_is_logged_with_its_request_id_and_leaks_nothing(
    failing_app: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = await failing_app.get(MISSING_TASK, headers={"X-Request-ID": "trace-me-500"})
    problem = assert_problem(response, 500)
    assert problem["detail"] == "internal error; it has been logged"
    assert problem["request_id"] == "trace-me-500"
    assert "secret" not in response.text
    for leak in INTERNALS:
        assert leak not in response.text

    (logged,) = [r for r in caplog.records if r.name == "taskbox.api.errors"]
    assert logged.levelno == logging.ERROR
    assert logged.__dict__["request_id"] == "trace-me-500"
    (handler_line,) = [r for r in caplog.records if r.name == "tests.broken"]
    assert handler_line.__dict__["request_id"] == "trace-me-500"


async def test_the_id_is_unbound_once_the_request_is_answered(
    failing_app: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    first = await failing_app.get(MISSING_TASK)
    second = await failing_app.get(MISSING_TASK)
    logging.getLogger("tests.after").info("between requests")
    lines = [r for r in caplog.records if r.name == "tests.broken"]
    assert [r.__dict__["request_id"] for r in lines] == [
        request_id_of(first),
        request_id_of(second),
    ]
    (after,) = [r for r in caplog.records if r.name == "tests.after"]
    assert "request_id" not in after.__dict__


async def test_a_503_is_logged_with_its_request_id(
    down_client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskbox.api.errors"):
        response = await down_client.get(TASKS, headers={"X-Request-ID": "db-down-1"})
    problem = assert_problem(response, 503)
    assert problem["request_id"] == "db-down-1"
    logged = [r for r in caplog.records if r.name == "taskbox.api.errors"]
    assert logged, caplog.text
    assert all(r.__dict__["request_id"] == "db-down-1" for r in logged)


async def test_openapi_documents_the_header_on_every_response(
    client: httpx.AsyncClient,
) -> None:
    schema = (await client.get("/openapi.json")).json()
    documented = [
        (path, method, status, response.get("headers", {}))
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        for status, response in operation["responses"].items()
    ]
    assert documented
    for path, method, status, headers in documented:
        assert headers.get("X-Request-ID", {}).get("required") is True, (path, method, status)
    assert "request_id" in schema["components"]["schemas"]["Problem"]["properties"]
