"""Client input that Postgres, asyncpg or the JSON encoder cannot take: a precise 4xx.

Each of these came back as a 500 (a review reproduced them against a running api):
moments whose offset carries them out of years 1-9999 in UTC (asyncpg's
``OverflowError``), in a filter or a forged cursor; a NUL character in the ``type``
filter (Postgres' ``CharacterNotInRepertoireError``); a payload key that is a lone
surrogate, whose 422 could not be encoded as JSON.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable

import asyncpg
import httpx
import orjson
import pytest

from tests.integration.test_api_tasks import (
    TASKS,
    assert_field_errors,
    assert_problem,
    create,
    row_counts,
)

BATCH = f"{TASKS}/batch"

# Year 1 at +14:00 is year 0 in UTC, year 9999 at -14:00 is year 10000.
TOO_EARLY = "0001-01-01T00:00:00+14:00"
TOO_LATE = "9999-12-31T23:59:59-14:00"


def too_early(moment: str) -> str:
    return (
        f"Value error, {moment!r} is out of range: in UTC it falls before "
        "0001-01-01T00:00:00.000001Z, the earliest moment accepted"
    )


def too_late(moment: str) -> str:
    return (
        f"Value error, {moment!r} is out of range: in UTC it falls after "
        "9999-12-31T23:59:59.999998Z, the latest moment accepted"
    )


TOO_EARLY_MSG = too_early(TOO_EARLY)
TOO_LATE_MSG = too_late(TOO_LATE)
OUT_OF_RANGE = [
    pytest.param(TOO_EARLY, TOO_EARLY_MSG, id="before-year-1"),
    pytest.param(TOO_LATE, TOO_LATE_MSG, id="after-year-9999"),
]


@pytest.mark.parametrize("name", ["created_after", "created_before"])
@pytest.mark.parametrize(("moment", "msg"), OUT_OF_RANGE)
async def test_a_filter_moment_out_of_range_in_utc_is_a_422_naming_the_parameter(
    client: httpx.AsyncClient, pool: asyncpg.Pool, name: str, moment: str, msg: str
) -> None:
    response = await client.get(TASKS, params={name: moment})

    assert_field_errors(response, [(["query", name], msg, "value_error")])
    assert await row_counts(pool) == (0, 0)


@pytest.mark.parametrize("moment", [TOO_EARLY, TOO_LATE])
async def test_a_forged_cursor_holding_a_moment_out_of_range_is_a_malformed_cursor(
    client: httpx.AsyncClient, pool: asyncpg.Pool, moment: str
) -> None:
    raw = json.dumps([moment, str(uuid.uuid4())]).encode()
    cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")

    response = await client.get(TASKS, params={"cursor": cursor})

    assert_field_errors(
        response,
        [
            (
                ["query", "cursor"],
                "cursor is not one this API issued; use next_cursor as given",
                "value_error",
            )
        ],
    )
    assert await row_counts(pool) == (0, 0)


async def test_a_nul_in_the_type_filter_is_a_422_naming_the_parameter(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await client.get(f"{TASKS}?type=ec%00ho")

    assert_field_errors(
        response,
        [
            (
                ["query", "type"],
                "Value error, text may not contain NUL characters or lone surrogates "
                "(U+0000 at index 2)",
                "value_error",
            )
        ],
    )
    assert await row_counts(pool) == (0, 0)


KEY_MSG = "keys may not contain NUL characters or lone surrogates (U+D800 at index 0)"


async def test_a_lone_surrogate_payload_key_is_a_422_that_renders_on_create(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    body = b'{"type": "echo", "payload": {"\\ud800": 1}}'

    response = await client.post(TASKS, content=body, headers={"content-type": "application/json"})

    # The key is written as its escape, so a strict parser reads the 422 too.
    orjson.loads(response.content)
    assert_field_errors(response, [(["body", "payload", "\\ud800"], KEY_MSG, "unstorable_value")])
    assert await row_counts(pool) == (0, 0)


async def test_a_lone_surrogate_payload_key_is_a_422_that_renders_on_batch(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    body = b'{"tasks": [{"type": "echo"}, {"type": "echo", "payload": {"\\ud800": 1}}]}'

    response = await client.post(BATCH, content=body, headers={"content-type": "application/json"})

    orjson.loads(response.content)
    assert_field_errors(
        response, [(["body", "tasks", 1, "payload", "\\ud800"], KEY_MSG, "unstorable_value")]
    )
    assert await row_counts(pool) == (0, 0)


@pytest.mark.parametrize(("moment", "msg"), OUT_OF_RANGE)
async def test_run_at_out_of_range_in_utc_says_so_on_create_and_batch(
    client: httpx.AsyncClient, pool: asyncpg.Pool, moment: str, msg: str
) -> None:
    # These were already refused ("run_at is out of range"); one check for every moment
    # now says which end of the range was crossed, as the filters do.
    single = await client.post(TASKS, json={"type": "echo", "run_at": moment})
    assert_field_errors(single, [(["body", "run_at"], msg, "value_error")])

    batch = await client.post(BATCH, json={"tasks": [{"type": "echo", "run_at": moment}]})
    assert_field_errors(batch, [(["body", "tasks", 0, "run_at"], msg, "value_error")])
    assert await row_counts(pool) == (0, 0)


# asyncpg sends the first and the last moment Python has as -infinity and infinity, and
# reads those back as datetimes without an offset: a task with run_at
# 0001-01-01T00:00:00Z was stored as -infinity and answered 201 with a run_at the
# document does not allow ("0001-01-01T00:00:00"). Found by make fuzz.
THE_ENDS = [
    pytest.param("0001-01-01T00:00:00Z", too_early, id="first-moment"),
    pytest.param("0001-01-01T05:00:00+05:00", too_early, id="first-moment-at-an-offset"),
    pytest.param("0001-01-01T00:00:00", too_early, id="first-moment-without-an-offset"),
    pytest.param("9999-12-31T23:59:59.999999Z", too_late, id="last-moment"),
]


@pytest.mark.parametrize(("moment", "msg"), THE_ENDS)
async def test_the_first_and_last_moments_are_refused_as_asyncpg_sends_them_as_infinities(
    client: httpx.AsyncClient, pool: asyncpg.Pool, moment: str, msg: Callable[[str], str]
) -> None:
    created = await client.post(TASKS, json={"type": "echo", "run_at": moment})
    assert_field_errors(created, [(["body", "run_at"], msg(moment), "value_error")])

    listed = await client.get(TASKS, params={"created_after": moment})
    assert_field_errors(listed, [(["query", "created_after"], msg(moment), "value_error")])
    assert await row_counts(pool) == (0, 0)


async def test_a_microsecond_inside_the_ends_is_accepted(client: httpx.AsyncClient) -> None:
    created = await create(client, run_at="0001-01-01T00:00:00.000001Z")
    assert created["run_at"] == "0001-01-01T00:00:00.000001Z"
    listed = await client.get(TASKS, params={"created_before": "9999-12-31T23:59:59.999998Z"})
    assert [task["id"] for task in listed.json()["items"]] == [created["id"]]


# The other text a client sends, each checked (or ignored) before it could reach
# Postgres or the renderer. They were never 500s; they stay so.
@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        pytest.param("GET", f"{TASKS}/%00", None, {}, 404, id="nul-task-id"),
        pytest.param("GET", f"{TASKS}?status=%00", None, {}, 422, id="nul-status"),
        pytest.param("POST", TASKS, b'{"type": "ec\\u0000ho"}', {}, 422, id="nul-type"),
        pytest.param("POST", TASKS, b'{"type": "\\ud800"}', {}, 422, id="surrogate-type"),
        pytest.param(
            "POST", TASKS, b'{"type": "echo", "\\ud800": 1}', {}, 422, id="surrogate-field"
        ),
        pytest.param(
            "POST", BATCH, b'{"tasks": [{"type": "ec\\u0000ho"}]}', {}, 422, id="batch-nul-type"
        ),
        pytest.param(
            "POST",
            TASKS,
            b'{"type": "echo"}',
            {"idempotency-key": "a\x00b"},
            422,
            id="nul-idempotency-key",
        ),
    ],
)
async def test_other_text_inputs_are_refused_before_the_database(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    status: int,
) -> None:
    response = await client.request(
        method, path, content=body, headers={"content-type": "application/json", **headers}
    )

    assert_problem(response, status)
    assert await row_counts(pool) == (0, 0)
