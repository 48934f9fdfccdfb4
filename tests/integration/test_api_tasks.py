"""The REST API over HTTP, in-process, against the real Postgres (no mocks).

Each test gets its own database (``database_url``) and an app client on it (``client``,
see ``tests/integration/conftest.py``); assertions on what was stored read the database
through ``pool``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from taskbox.api.settings import ApiSettings
from taskbox.db.settings import DatabaseSettings
from taskbox.tasktypes import default_registry
from tests.integration.conftest import app_client_for

TASKS = "/api/v1/tasks"
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "request_id"}
TASK_KEYS = {
    "id",
    "run_at",
    "queue",
    "type",
    "status",
    "priority",
    "payload",
    "result",
    "error",
    "attempts",
    "max_attempts",
    "cancel_requested",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
}
# A listed task: everything but the two unbounded fields, which only GET /tasks/{id} has.
SUMMARY_KEYS = TASK_KEYS - {"payload", "result"}
BUILTIN_TYPES = {"echo", "fail", "sha256", "sleep"}
# Leaks a problem body must never contain.
INTERNALS = ("Traceback", "asyncpg", "SELECT", "INSERT", "postgresql://", 'File "')


# --------------------------------------------------------------------------- helpers


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """``response`` is an RFC 9457 problem with ``status``; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body: dict[str, Any] = response.json()
    assert body.keys() >= PROBLEM_KEYS, body
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert body["instance"] == response.request.url.path
    for leak in INTERNALS:
        assert leak not in response.text, response.text
    return body


def assert_field_errors(
    response: httpx.Response, expected: list[tuple[list[str | int], str, str]]
) -> dict[str, Any]:
    """A 422 problem whose ``errors`` are exactly ``expected`` (loc, msg, type)."""
    body = assert_problem(response, 422)
    wanted = [{"loc": loc, "msg": msg, "type": kind} for loc, msg, kind in expected]
    assert body["errors"] == wanted, body
    first_loc, first_msg, _ = expected[0]
    more = f" (and {len(expected) - 1} more)" if len(expected) > 1 else ""
    assert body["detail"] == f"{'.'.join(map(str, first_loc))}: {first_msg}{more}"
    return body


async def row_counts(pool: asyncpg.Pool) -> tuple[int, int]:
    tasks = await pool.fetchval("SELECT count(*) FROM tasks")
    outbox = await pool.fetchval("SELECT count(*) FROM outbox")
    return int(tasks), int(outbox)


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    body.setdefault("type", "echo")
    response = await client.post(TASKS, json=body)
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    return task


async def insert_task(
    pool: asyncpg.Pool,
    created_at: datetime,
    *,
    type_: str = "echo",
    status: str = "NEW",
) -> str:
    """A task inserted with SQL, with a chosen ``created_at``; returns its id."""
    task_id = await pool.fetchval(
        "INSERT INTO tasks (type, payload, status, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, $4) RETURNING id",
        type_,
        {},
        status,
        created_at,
    )
    return str(task_id)


async def insert_large_tasks(
    pool: asyncpg.Pool, count: int, payload_bytes: int, *, result_bytes: int = 0
) -> None:
    """``count`` DONE tasks whose payload (and result, if asked) is a JSON object of
    about that many bytes, written with SQL (the API's own limits would refuse them)."""
    await pool.execute(
        "INSERT INTO tasks (type, payload, result, status, created_at, updated_at)"
        " SELECT 'echo', jsonb_build_object('blob', repeat('p', $2)),"
        "        CASE WHEN $3 > 0 THEN jsonb_build_object('blob', repeat('r', $3)) END,"
        "        'DONE', t, t"
        " FROM (SELECT now() - n * interval '1 second' AS t"
        "       FROM generate_series(1, $1) AS n) AS moments",
        count,
        payload_bytes,
        result_bytes,
    )


async def set_status(pool: asyncpg.Pool, task_id: str, status: str) -> None:
    updated = await pool.execute(
        "UPDATE tasks SET status = $2 WHERE id = $1", uuid.UUID(task_id), status
    )
    assert updated == "UPDATE 1"


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def list_ids(client: httpx.AsyncClient, params: Any) -> list[str]:
    response = await client.get(TASKS, params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


async def walk(client: httpx.AsyncClient, limit: int, **params: Any) -> list[dict[str, Any]]:
    """Every page of the listing, following ``next_cursor`` until it is null."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(1000):
        query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        response = await client.get(TASKS, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= limit
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
        assert len(page["items"]) == limit, "a page with a next_cursor must be full"
    raise AssertionError("the cursor walk did not end")


# --------------------------------------------------------------------------- POST


async def test_create_answers_201_new_with_a_location_that_gets_the_same_task(
    client: httpx.AsyncClient, api_settings: ApiSettings
) -> None:
    response = await client.post(TASKS, json={"type": "sha256", "payload": {"text": "hi"}})

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    task = response.json()
    assert task.keys() == TASK_KEYS
    assert task["status"] == "NEW"
    assert task["type"] == "sha256"
    assert task["payload"] == {"text": "hi"}
    assert task["priority"] == 0
    assert task["max_attempts"] == api_settings.default_max_attempts
    assert task["attempts"] == 0
    assert task["cancel_requested"] is False
    assert task["result"] is None
    assert task["error"] is None
    assert task["started_at"] is None
    assert task["finished_at"] is None
    assert task["created_at"] == task["updated_at"]
    uuid.UUID(task["id"])

    location = response.headers["location"]
    assert location == f"{TASKS}/{task['id']}"
    fetched = await client.get(location)
    assert fetched.status_code == 200, fetched.text
    assert fetched.json() == task


async def test_create_stores_the_task_and_exactly_one_unpublished_outbox_event(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    task = await create(client, type="sleep", payload={"seconds": 1.5}, priority=7, max_attempts=5)
    task_id = uuid.UUID(task["id"])

    row = await pool.fetchrow("SELECT * FROM tasks WHERE id = $1", task_id)
    assert row is not None
    assert row["type"] == "sleep"
    assert row["payload"] == {"seconds": 1.5}
    assert row["status"] == "NEW"
    assert row["priority"] == 7
    assert row["max_attempts"] == 5
    assert row["attempts"] == 0
    assert row["created_at"] == parse_time(task["created_at"])

    events = await pool.fetch("SELECT * FROM outbox")
    assert len(events) == 1, events
    event = events[0]
    assert event["task_id"] == task_id
    assert event["kind"] == "task.created"
    assert event["body"] == {"task_id": str(task_id), "type": "sleep", "priority": 7}
    assert event["published_at"] is None
    assert event["publish_attempts"] == 0
    assert await row_counts(pool) == (1, 1)


async def test_create_notifies_the_outbox_channel(
    client: httpx.AsyncClient, db_settings: DatabaseSettings
) -> None:
    received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_notify(_conn: object, _pid: int, channel: str, payload: str) -> None:
        received.put_nowait((channel, payload))

    listener = await asyncpg.connect(db_settings.database_url)
    try:
        await listener.add_listener(db_settings.outbox_channel, on_notify)
        assert received.empty()

        await create(client, payload={"n": 1})

        async with asyncio.timeout(5):
            channel, _ = await received.get()
        assert channel == db_settings.outbox_channel
    finally:
        await listener.close()


REJECTED_BODIES: list[Any] = [
    pytest.param(
        {"type": "sha256", "payload": {}},
        [(["body", "payload", "text"], "Field required", "missing")],
        id="sha256-without-text",
    ),
    pytest.param(
        {"type": "sha256", "payload": {"text": "a", "extra": 1}},
        [(["body", "payload", "extra"], "Extra inputs are not permitted", "extra_forbidden")],
        id="sha256-extra-payload-field",
    ),
    pytest.param(
        {"type": "sleep", "payload": {"seconds": -1}},
        [
            (
                ["body", "payload", "seconds"],
                "Input should be greater than or equal to 0",
                "greater_than_equal",
            )
        ],
        id="sleep-negative-seconds",
    ),
    pytest.param(
        # capped below HANDLER_TIMEOUT's default: a longer sleep could only time out
        {"type": "sleep", "payload": {"seconds": 3600}},
        [
            (
                ["body", "payload", "seconds"],
                "Input should be less than or equal to 60",
                "less_than_equal",
            )
        ],
        id="sleep-over-60-seconds",
    ),
    pytest.param(
        {"type": "echo", "payload": [1, 2]},
        [(["body", "payload"], "Input should be a valid dictionary", "dict_type")],
        id="payload-list",
    ),
    pytest.param(
        {"type": "echo", "payload": "x"},
        [(["body", "payload"], "Input should be a valid dictionary", "dict_type")],
        id="payload-string",
    ),
    pytest.param(
        {"type": "echo", "payload": None},
        [(["body", "payload"], "Input should be a valid dictionary", "dict_type")],
        id="payload-null",
    ),
    pytest.param(
        {"type": "echo", "payload": {}, "status": "DONE"},
        [(["body", "status"], "Extra inputs are not permitted", "extra_forbidden")],
        id="extra-top-level-status",
    ),
    pytest.param(
        {"payload": {}},
        [(["body", "type"], "Field required", "missing")],
        id="missing-type",
    ),
    pytest.param(
        {"type": ""},
        [(["body", "type"], "String should have at least 1 character", "string_too_short")],
        id="empty-type",
    ),
    pytest.param(
        {"type": "echo", "priority": 10},
        [(["body", "priority"], "Input should be less than or equal to 9", "less_than_equal")],
        id="priority-10",
    ),
    pytest.param(
        {"type": "echo", "priority": -1},
        [
            (
                ["body", "priority"],
                "Input should be greater than or equal to 0",
                "greater_than_equal",
            )
        ],
        id="priority-negative",
    ),
    pytest.param(
        {"type": "echo", "max_attempts": 0},
        [
            (
                ["body", "max_attempts"],
                "Input should be greater than or equal to 1",
                "greater_than_equal",
            )
        ],
        id="max_attempts-0",
    ),
    pytest.param(
        {"type": "echo", "priority": 10, "max_attempts": 0},
        [
            (["body", "priority"], "Input should be less than or equal to 9", "less_than_equal"),
            (
                ["body", "max_attempts"],
                "Input should be greater than or equal to 1",
                "greater_than_equal",
            ),
        ],
        id="two-errors",
    ),
    pytest.param(
        [{"type": "echo"}],
        [
            (
                ["body"],
                "Input should be a valid dictionary or object to extract fields from",
                "model_attributes_type",
            )
        ],
        id="body-not-an-object",
    ),
]


@pytest.mark.parametrize(("body", "errors"), REJECTED_BODIES)
async def test_create_rejects_an_invalid_body_with_a_precise_422_and_writes_nothing(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    body: Any,
    errors: list[tuple[list[str | int], str, str]],
) -> None:
    response = await client.post(TASKS, json=body)

    assert_field_errors(response, errors)
    assert await row_counts(pool) == (0, 0)


async def test_create_rejects_an_unknown_type_naming_the_registered_ones(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    assert set(default_registry.names()) >= BUILTIN_TYPES

    response = await client.post(TASKS, json={"type": "nope", "payload": {}})

    known = ", ".join(default_registry.names())
    assert_field_errors(
        response,
        [(["body", "type"], f"unknown task type 'nope'; registered: {known}", "unknown_task_type")],
    )
    assert await row_counts(pool) == (0, 0)


@pytest.mark.parametrize("body", [{"type": name, "payload": {}} for name in sorted(BUILTIN_TYPES)])
async def test_with_builtin_task_types_off_a_builtin_type_is_unknown(
    api_settings: ApiSettings, pool: asyncpg.Pool, body: dict[str, Any]
) -> None:
    settings = ApiSettings(
        database_url=api_settings.database_url,
        outbox_channel=api_settings.outbox_channel,
        builtin_task_types=False,
    )
    async with app_client_for(settings) as client:
        response = await client.post(TASKS, json=body)
        (error,) = assert_problem(response, 422)["errors"]
        assert (error["loc"], error["type"]) == (["body", "type"], "unknown_task_type")
        # What is registered depends on the modules this test run imported; no built-in.
        prefix = f"unknown task type {body['type']!r}; registered: "
        assert error["msg"].startswith(prefix), error
        assert not BUILTIN_TYPES & set(error["msg"].removeprefix(prefix).split(", ")), error
        batch = await client.post(f"{TASKS}/batch", json={"tasks": [body]})
        assert_problem(batch, 422)
        assert batch.json()["errors"][0]["type"] == "unknown_task_type"
    assert await row_counts(pool) == (0, 0)


async def test_create_rejects_max_attempts_above_the_configured_maximum(
    client: httpx.AsyncClient, pool: asyncpg.Pool, api_settings: ApiSettings
) -> None:
    limit = api_settings.max_max_attempts

    response = await client.post(TASKS, json={"type": "echo", "max_attempts": limit + 1})

    assert_field_errors(
        response,
        [(["body", "max_attempts"], f"at most {limit} attempts are allowed", "less_than_equal")],
    )
    assert await row_counts(pool) == (0, 0)
    # The bound itself is allowed.
    assert (await create(client, max_attempts=limit))["max_attempts"] == limit


@pytest.mark.parametrize(
    ("field", "value"),
    [("priority", 0), ("priority", 9), ("max_attempts", 1)],
)
async def test_create_accepts_the_bounds(client: httpx.AsyncClient, field: str, value: int) -> None:
    assert (await create(client, **{field: value}))[field] == value


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "application/x+json"]
)
async def test_create_rejects_malformed_json_with_a_422_and_writes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, content_type: str
) -> None:
    text = '{"type": "echo",'
    headers = {"content-type": content_type}

    response = await client.post(TASKS, content=text.encode(), headers=headers)

    position = len(text)  # json.JSONDecodeError.pos: where the next value was expected
    assert_field_errors(response, [(["body", position], "JSON decode error", "json_invalid")])
    assert await row_counts(pool) == (0, 0)


async def test_create_without_a_body_is_a_422(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await client.post(TASKS)

    assert_field_errors(response, [(["body"], "Field required", "missing")])
    assert await row_counts(pool) == (0, 0)


# Payloads that parse but that Postgres jsonb (or the JSON encoder) cannot store: NUL
# characters, lone surrogates, integers past 64 bits. Once answered 500; a client
# error must be a 422 that points into the payload, with nothing written.
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"type": "sha256", "payload": {"text": "a\\u0000b"}}', id="nul-in-text"),
        pytest.param(b'{"type": "echo", "payload": {"x": "\\u0000"}}', id="nul-in-echo"),
        pytest.param(b'{"type": "echo", "payload": {"x": "\\ud800"}}', id="lone-surrogate"),
        pytest.param(
            b'{"type": "echo", "payload": {"x": 123456789012345678901234567890}}',
            id="int-beyond-64-bits",
        ),
    ],
)
async def test_unstorable_payload_is_a_422_not_a_500(
    client: httpx.AsyncClient, pool: asyncpg.Pool, body: bytes
) -> None:
    response = await client.post(TASKS, content=body, headers={"content-type": "application/json"})

    body_json = assert_problem(response, 422)
    assert body_json["errors"], body_json
    assert body_json["errors"][0]["loc"][:2] == ["body", "payload"], body_json
    assert await row_counts(pool) == (0, 0)


# The body parser accepts the non-JSON constants NaN and Infinity, which the encoder
# would store as null: the payload would silently differ from what the client sent.
# RFC 8259 has no NaN/Infinity, so they are a 422.
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_non_json_number_constants_are_rejected_not_stored_as_null(
    client: httpx.AsyncClient, pool: asyncpg.Pool, constant: str
) -> None:
    body = f'{{"type": "echo", "payload": {{"x": {constant}}}}}'.encode()

    response = await client.post(TASKS, content=body, headers={"content-type": "application/json"})

    assert response.status_code != 201 or response.json()["payload"] != {"x": None}, (
        f"{constant} was stored as null: {response.text}"
    )
    assert_problem(response, 422)
    assert await row_counts(pool) == (0, 0)


# --------------------------------------------------------------------------- GET list


async def test_list_is_newest_first(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    created = [(await create(client, payload={"n": n}))["id"] for n in range(6)]

    response = await client.get(TASKS)

    assert response.status_code == 200, response.text
    page = response.json()
    assert page.keys() == {"items", "next_cursor"}
    assert [item["id"] for item in page["items"]] == created[::-1]
    assert page["next_cursor"] is None
    assert all(item.keys() == SUMMARY_KEYS for item in page["items"])
    times = [parse_time(item["created_at"]) for item in page["items"]]
    assert times == sorted(times, reverse=True)


async def test_list_filters_by_status_and_type(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    echo_new = (await create(client, type="echo"))["id"]
    echo_cancelled = (await create(client, type="echo"))["id"]
    sha_new = (await create(client, type="sha256", payload={"text": "x"}))["id"]
    sha_pending = (await create(client, type="sha256", payload={"text": "y"}))["id"]
    sleep_done = (await create(client, type="sleep", payload={"seconds": 0}))["id"]
    sleep_cancelled = (await create(client, type="sleep", payload={"seconds": 0}))["id"]
    for task_id in (echo_cancelled, sleep_cancelled):
        assert (await client.delete(f"{TASKS}/{task_id}")).status_code == 200
    await set_status(pool, sha_pending, "PENDING")
    await set_status(pool, sleep_done, "DONE")

    async def ids(params: Any) -> set[str]:
        return set(await list_ids(client, params))

    assert await ids({"status": "NEW"}) == {echo_new, sha_new}
    assert await ids([("status", "NEW"), ("status", "CANCELLED")]) == {
        echo_new,
        sha_new,
        echo_cancelled,
        sleep_cancelled,
    }
    assert await ids({"status": "PENDING"}) == {sha_pending}
    assert await ids({"status": "FAILED"}) == set()
    assert await ids({"type": "sha256"}) == {sha_new, sha_pending}
    assert await ids({"type": "nope"}) == set()
    assert await ids([("type", "sleep"), ("status", "CANCELLED")]) == {sleep_cancelled}
    assert await ids([("status", "DONE"), ("status", "PENDING"), ("type", "sleep")]) == {sleep_done}
    assert len(await ids({})) == 6


async def test_list_rejects_an_unknown_status(client: httpx.AsyncClient) -> None:
    response = await client.get(TASKS, params=[("status", "NEW"), ("status", "BOGUS")])

    assert_field_errors(
        response,
        [
            (
                ["query", "status", 1],
                "Input should be 'NEW', 'PENDING', 'PROCESSING', 'DONE', 'FAILED' or 'CANCELLED'",
                "enum",
            )
        ],
    )


async def test_list_created_after_and_before_are_exclusive_bounds(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    t0 = datetime(2031, 1, 1, tzinfo=UTC)
    first = await insert_task(pool, t0)
    second = await insert_task(pool, t0 + timedelta(hours=1))
    third = await insert_task(pool, t0 + timedelta(hours=2))

    async def ids(**params: str) -> list[str]:
        return await list_ids(client, params)

    assert await ids(created_after=t0.isoformat()) == [third, second]
    assert await ids(created_before=(t0 + timedelta(hours=2)).isoformat()) == [second, first]
    assert await ids(
        created_after=t0.isoformat(), created_before=(t0 + timedelta(hours=2)).isoformat()
    ) == [second]
    assert await ids(created_after=(t0 - timedelta(microseconds=1)).isoformat()) == [
        third,
        second,
        first,
    ]
    assert await ids(created_before=t0.isoformat()) == []
    # The same instant written with another offset, with Z, and without an offset (UTC).
    assert await ids(created_after="2031-01-01T01:00:00+01:00") == [third, second]
    assert await ids(created_after="2031-01-01T00:00:00Z") == [third, second]
    assert await ids(created_after="2031-01-01T00:00:00") == [third, second]


async def test_list_rejects_a_malformed_timestamp(client: httpx.AsyncClient) -> None:
    response = await client.get(TASKS, params={"created_after": "yesterday"})

    body = assert_problem(response, 422)
    assert [e["loc"] for e in body["errors"]] == [["query", "created_after"]]
    assert "'yesterday' is not an ISO 8601 timestamp" in body["errors"][0]["msg"]


@pytest.mark.parametrize(
    ("limit", "errors"),
    [
        (
            "0",
            [
                (
                    ["query", "limit"],
                    "Input should be greater than or equal to 1",
                    "greater_than_equal",
                )
            ],
        ),
        (
            "101",
            [(["query", "limit"], "Input should be less than or equal to 100", "less_than_equal")],
        ),
        (
            "ten",
            [
                (
                    ["query", "limit"],
                    "Input should be a valid integer, unable to parse string as an integer",
                    "int_parsing",
                )
            ],
        ),
    ],
)
async def test_list_rejects_a_limit_out_of_bounds(
    client: httpx.AsyncClient, limit: str, errors: list[tuple[list[str | int], str, str]]
) -> None:
    assert_field_errors(await client.get(TASKS, params={"limit": limit}), errors)


async def test_list_limit_bounds_1_and_100_are_accepted(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    base = datetime(2031, 1, 1, tzinfo=UTC)
    ids = [await insert_task(pool, base + timedelta(seconds=n)) for n in range(101)]

    one = await client.get(TASKS, params={"limit": 1})
    assert one.status_code == 200, one.text
    assert [item["id"] for item in one.json()["items"]] == [ids[-1]]
    assert one.json()["next_cursor"] is not None

    hundred = await client.get(TASKS, params={"limit": 100})
    assert hundred.status_code == 200, hundred.text
    assert [item["id"] for item in hundred.json()["items"]] == ids[::-1][:100]
    assert hundred.json()["next_cursor"] is not None

    default = await client.get(TASKS)
    assert len(default.json()["items"]) == 50


@pytest.mark.parametrize(("total", "limit"), [(23, 4), (8, 4), (4, 4), (1, 4), (0, 4), (5, 1)])
async def test_cursor_walk_sees_every_task_once_in_order(
    client: httpx.AsyncClient, pool: asyncpg.Pool, total: int, limit: int
) -> None:
    # Groups of three share a created_at, so the id tie-breaker is exercised.
    base = datetime(2031, 1, 1, tzinfo=UTC)
    for n in range(total):
        await insert_task(pool, base + timedelta(seconds=n // 3))
    expected = [
        str(r["id"])
        for r in await pool.fetch("SELECT id FROM tasks ORDER BY created_at DESC, id DESC")
    ]

    items = await walk(client, limit)

    assert [item["id"] for item in items] == expected
    assert len(items) == total


async def test_cursor_walk_with_filters_keeps_the_filters(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    base = datetime(2031, 1, 1, tzinfo=UTC)
    wanted = []
    for n in range(30):
        task_id = await insert_task(
            pool, base + timedelta(seconds=n), type_="sha256" if n % 2 else "echo"
        )
        if n % 2:
            wanted.append(task_id)

    items = await walk(client, 4, type="sha256")

    assert [item["id"] for item in items] == wanted[::-1]


async def test_cursor_walk_is_stable_under_concurrent_inserts(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    rng = random.Random(1234)
    base = datetime.now(UTC) - timedelta(hours=1)
    existing = [await insert_task(pool, base + timedelta(seconds=n // 2)) for n in range(80)]
    inserted: list[str] = []
    stop = asyncio.Event()
    progress = asyncio.Event()

    async def keep_inserting() -> None:
        while not stop.is_set():
            # Newest tasks over HTTP (these shift an offset-based listing) and, in
            # between, rows dated inside the range being walked.
            inserted.append((await create(client, payload={"late": True}))["id"])
            moment = base + timedelta(seconds=rng.uniform(0, 40))
            inserted.append(await insert_task(pool, moment))
            progress.set()

    inserter = asyncio.create_task(keep_inserting())
    seen: list[dict[str, Any]] = []
    pages = 0
    try:
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 7}
            if cursor:
                params["cursor"] = cursor
            response = await client.get(TASKS, params=params)
            assert response.status_code == 200, response.text
            seen.extend(response.json()["items"])
            pages += 1
            cursor = response.json()["next_cursor"]
            if cursor is None:
                break
            assert pages < 200, "the walk does not end"

            # Let the inserter land rows between every two pages.
            target = len(inserted) + 2
            async with asyncio.timeout(5):
                while len(inserted) < target:
                    progress.clear()
                    await progress.wait()
    finally:
        stop.set()
        await inserter

    seen_ids = [item["id"] for item in seen]
    assert len(seen_ids) == len(set(seen_ids)), "a task was listed twice"
    for task_id in existing:
        assert seen_ids.count(task_id) == 1, f"pre-existing task {task_id} was skipped"
    assert set(seen_ids) <= set(existing) | set(inserted)
    keys = [(parse_time(item["created_at"]), uuid.UUID(item["id"])) for item in seen]
    assert keys == sorted(keys, reverse=True)
    assert len(set(keys)) == len(keys)
    assert pages >= len(existing) // 7
    assert len(inserted) >= 2 * (pages - 1), "the inserter did not run during the walk"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("not a cursor!", id="not-base64"),
        pytest.param("", id="empty"),
        pytest.param(_b64(b"garbage"), id="not-json"),
        pytest.param(_b64(json.dumps(["yesterday", str(uuid.uuid4())]).encode()), id="bad-date"),
        pytest.param(
            _b64(json.dumps(["2031-01-01T00:00:00", str(uuid.uuid4())]).encode()),
            id="naive-date",
        ),
        pytest.param(_b64(json.dumps(["2031-01-01T00:00:00+00:00", "x"]).encode()), id="bad-id"),
        pytest.param(_b64(json.dumps([1, 2, 3]).encode()), id="three-items"),
        pytest.param(_b64(json.dumps({"a": 1}).encode()), id="object"),
    ],
)
async def test_list_rejects_an_invalid_cursor(client: httpx.AsyncClient, cursor: str) -> None:
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


async def test_list_rejects_an_overlong_cursor(client: httpx.AsyncClient) -> None:
    response = await client.get(TASKS, params={"cursor": "A" * 201})

    assert_field_errors(
        response,
        [(["query", "cursor"], "String should have at most 200 characters", "string_too_long")],
    )


# ------------------------------------------------------- GET list: summaries, full view

# What one page of the default listing may weigh: 100 summaries are about 40 KiB.
LIST_BOUND = 64 * 1024


def listed_bytes(item: dict[str, Any]) -> int:
    """The bytes a full-view item counts against MAX_PAGE_BYTES: its payload, result and
    error as JSON text (Postgres writes jsonb as json.dumps does, for ASCII)."""
    return sum(
        len(json.dumps(item[field]))
        for field in ("payload", "result", "error")
        if item[field] is not None
    )


async def test_list_items_are_summaries_without_payload_or_result(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    task = await create(client, payload={"x": "the payload"})
    await pool.execute(
        "UPDATE tasks SET status = 'FAILED', result = $2, error = $3 WHERE id = $1",
        uuid.UUID(task["id"]),
        {"partial": "result"},
        {"type": "Boom", "message": "the last attempt failed"},
    )

    response = await client.get(TASKS)

    assert response.status_code == 200, response.text
    (item,) = response.json()["items"]
    assert item.keys() == SUMMARY_KEYS
    assert item["error"] == {"type": "Boom", "message": "the last attempt failed"}
    whole = (await client.get(f"{TASKS}/{task['id']}")).json()
    assert (whole["payload"], whole["result"]) == ({"x": "the payload"}, {"partial": "result"})
    assert {key: whole[key] for key in SUMMARY_KEYS} == item


async def test_a_list_of_large_tasks_stays_small(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    # 100 tasks of 1 MB payloads once made one listing of 100 MB.
    await insert_large_tasks(pool, 100, 1_000_000)

    response = await client.get(TASKS, params={"limit": 100})

    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == 100
    assert len(response.content) < LIST_BOUND, f"{len(response.content)} bytes"


async def test_the_full_view_lists_whole_tasks(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    created = [(await create(client, payload={"n": n}))["id"] for n in range(3)]
    await pool.execute(
        "UPDATE tasks SET status = 'DONE', result = payload WHERE id = $1",
        uuid.UUID(created[0]),
    )

    response = await client.get(TASKS, params={"view": "full"})

    assert response.status_code == 200, response.text
    page = response.json()
    assert page["next_cursor"] is None
    assert [item["id"] for item in page["items"]] == created[::-1]
    for item in page["items"]:
        assert item.keys() == TASK_KEYS
        assert item == (await client.get(f"{TASKS}/{item['id']}")).json()
    assert page["items"][-1]["result"] == {"n": 0}


async def test_the_full_view_ends_a_page_at_the_byte_budget(
    api_settings: ApiSettings, pool: asyncpg.Pool
) -> None:
    budget = 10_000
    # Ten tasks of 3,012 bytes (payload and result together): three fit in the budget.
    await insert_large_tasks(pool, 10, 1_500, result_bytes=1_488)
    expected = [
        str(r["id"])
        for r in await pool.fetch("SELECT id FROM tasks ORDER BY created_at DESC, id DESC")
    ]
    settings = ApiSettings(
        database_url=api_settings.database_url,
        outbox_channel=api_settings.outbox_channel,
        max_page_bytes=budget,
    )
    async with app_client_for(settings) as limited:
        pages: list[list[dict[str, Any]]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"view": "full", "limit": 100}
            if cursor:
                params["cursor"] = cursor
            response = await limited.get(TASKS, params=params)
            assert response.status_code == 200, response.text
            pages.append(response.json()["items"])
            cursor = response.json()["next_cursor"]
            if cursor is None:
                break
            assert len(pages) < 20, "the walk does not end"

        assert [len(page) for page in pages] == [3, 3, 3, 1]
        assert [item["id"] for page in pages for item in page] == expected
        assert all(listed_bytes(item) == 3_012 for page in pages for item in page)
        assert all(sum(map(listed_bytes, page)) <= budget for page in pages)

        # A task larger than the whole budget still comes, alone on its page, so a walk
        # never stalls; the summaries are not budgeted.
        await pool.execute(
            "INSERT INTO tasks (type, payload, status, created_at, updated_at)"
            " VALUES ('echo', jsonb_build_object('blob', repeat('x', 20000)), 'NEW',"
            "         now() + interval '1 minute', now() + interval '1 minute')"
        )
        first = (await limited.get(TASKS, params={"view": "full", "limit": 100})).json()
        assert len(first["items"]) == 1
        assert listed_bytes(first["items"][0]) > budget
        assert first["next_cursor"] is not None
        summaries = (await limited.get(TASKS, params={"limit": 100})).json()
        assert len(summaries["items"]) == 11


async def test_a_full_page_of_large_tasks_stays_within_the_default_budget(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await insert_large_tasks(pool, 5, 1_000_000)

    response = await client.get(TASKS, params={"view": "full", "limit": 100})

    assert response.status_code == 200, response.text
    page = response.json()
    assert len(page["items"]) == 1  # two of them would pass the 1 MiB budget
    assert page["next_cursor"] is not None
    assert len(response.content) < 1_048_576 + LIST_BOUND


async def test_list_rejects_an_unknown_view(client: httpx.AsyncClient) -> None:
    response = await client.get(TASKS, params={"view": "everything"})

    body = assert_problem(response, 422)
    assert [error["loc"] for error in body["errors"]] == [["query", "view"]]
    assert "'summary' or 'full'" in body["errors"][0]["msg"]


# --------------------------------------------------------------------------- GET one


async def test_get_returns_the_whole_task_as_stored(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    task = await create(client, type="echo", payload={"a": [1, 2], "b": None}, priority=4)
    await pool.execute(
        "UPDATE tasks SET status = 'DONE', result = $2, error = $3, attempts = 2,"
        " started_at = now() - interval '1 minute', finished_at = now(), updated_at = now(),"
        " worker_id = 'w-1', heartbeat_at = now() WHERE id = $1",
        uuid.UUID(task["id"]),
        {"a": [1, 2], "b": None},
        {"type": "Boom", "message": "first attempt failed"},
    )
    row = await pool.fetchrow("SELECT * FROM tasks WHERE id = $1", uuid.UUID(task["id"]))
    assert row is not None

    response = await client.get(f"{TASKS}/{task['id']}")

    assert response.status_code == 200, response.text
    got = response.json()
    assert got.keys() == TASK_KEYS  # worker_id, heartbeat_at, idempotency_key stay inside
    assert got["id"] == task["id"]
    for key in ("type", "status", "priority", "payload", "result", "error", "attempts"):
        assert got[key] == row[key], key
    assert got["max_attempts"] == row["max_attempts"]
    assert got["cancel_requested"] is row["cancel_requested"]
    for key in ("created_at", "updated_at", "started_at", "finished_at"):
        assert parse_time(got[key]) == row[key], key


async def test_get_an_unknown_task_is_a_404_problem(client: httpx.AsyncClient) -> None:
    await create(client)
    missing = uuid.uuid4()

    response = await client.get(f"{TASKS}/{missing}")

    body = assert_problem(response, 404)
    assert body["title"] == "Not Found"
    assert body["detail"] == f"task {missing} does not exist"
    assert "errors" not in body


@pytest.mark.parametrize("suffix", ["", "/status"])
async def test_a_malformed_task_id_names_no_task(client: httpx.AsyncClient, suffix: str) -> None:
    response = await client.get(f"{TASKS}/not-a-uuid{suffix}")

    body = assert_problem(response, 404)
    assert body["detail"] == "no task has the id 'not-a-uuid': task ids are UUIDs"


async def test_the_batch_path_is_not_taken_for_a_task_id(client: httpx.AsyncClient) -> None:
    for method in ("GET", "DELETE", "PUT"):
        response = await client.request(method, f"{TASKS}/batch")
        assert_problem(response, 405)
        assert response.headers["allow"] == "POST"


# --------------------------------------------------------------------------- status


async def test_status_returns_only_id_status_and_updated_at(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    task = await create(client)
    path = f"{TASKS}/{task['id']}/status"

    first = await client.get(path)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "id": task["id"],
        "status": "NEW",
        "updated_at": task["updated_at"],
    }

    later = datetime(2031, 1, 1, 12, tzinfo=UTC)
    await pool.execute(
        "UPDATE tasks SET status = 'PROCESSING', updated_at = $2 WHERE id = $1",
        uuid.UUID(task["id"]),
        later,
    )
    second = await client.get(path)
    assert second.status_code == 200, second.text
    view = second.json()
    assert view.keys() == {"id", "status", "updated_at"}
    assert view["status"] == "PROCESSING"
    assert parse_time(view["updated_at"]) == later


async def test_status_of_an_unknown_task_is_a_404_problem(client: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()

    body = assert_problem(await client.get(f"{TASKS}/{missing}/status"), 404)

    assert body["detail"] == f"task {missing} does not exist"


# --------------------------------------------------------------------------- DELETE


@pytest.mark.parametrize("status", ["NEW", "PENDING"])
async def test_cancel_a_task_that_has_not_started_is_immediate(
    client: httpx.AsyncClient, pool: asyncpg.Pool, status: str
) -> None:
    task = await create(client)
    if status != "NEW":
        await set_status(pool, task["id"], status)

    response = await client.delete(f"{TASKS}/{task['id']}")

    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled.keys() == TASK_KEYS
    assert cancelled["status"] == "CANCELLED"
    assert cancelled["cancel_requested"] is False
    assert cancelled["finished_at"] is not None
    assert parse_time(cancelled["finished_at"]) >= parse_time(task["created_at"])
    assert parse_time(cancelled["updated_at"]) >= parse_time(task["updated_at"])
    row = await pool.fetchrow(
        "SELECT status, finished_at FROM tasks WHERE id = $1", uuid.UUID(task["id"])
    )
    assert row is not None
    assert row["status"] == "CANCELLED"
    assert row["finished_at"] == parse_time(cancelled["finished_at"])
    assert (await client.get(f"{TASKS}/{task['id']}")).json() == cancelled


async def test_cancel_a_running_task_is_requested_with_202_every_time(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    task = await create(client)
    await set_status(pool, task["id"], "PROCESSING")

    for _ in range(2):
        response = await client.delete(f"{TASKS}/{task['id']}")

        assert response.status_code == 202, response.text
        flagged = response.json()
        assert flagged["status"] == "PROCESSING"
        assert flagged["cancel_requested"] is True
        assert flagged["finished_at"] is None
        row = await pool.fetchrow(
            "SELECT status, cancel_requested, finished_at FROM tasks WHERE id = $1",
            uuid.UUID(task["id"]),
        )
        assert row is not None
        assert (row["status"], row["cancel_requested"], row["finished_at"]) == (
            "PROCESSING",
            True,
            None,
        )


@pytest.mark.parametrize("status", ["DONE", "FAILED", "CANCELLED"])
async def test_cancel_a_finished_task_is_a_409_problem_and_changes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, status: str
) -> None:
    task = await create(client)
    await set_status(pool, task["id"], status)
    before = await pool.fetchrow("SELECT * FROM tasks WHERE id = $1", uuid.UUID(task["id"]))

    response = await client.delete(f"{TASKS}/{task['id']}")

    body = assert_problem(response, 409)
    assert body["title"] == "Conflict"
    assert body["detail"] == f"task {task['id']} is already {status}; it cannot be cancelled"
    after = await pool.fetchrow("SELECT * FROM tasks WHERE id = $1", uuid.UUID(task["id"]))
    assert after == before


async def test_cancel_an_unknown_task_is_a_404_problem(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    missing = uuid.uuid4()

    body = assert_problem(await client.delete(f"{TASKS}/{missing}"), 404)

    assert body["detail"] == f"task {missing} does not exist"
    assert await row_counts(pool) == (0, 0)


async def test_cancel_a_malformed_id_names_no_task(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    body = assert_problem(await client.delete(f"{TASKS}/12345"), 404)

    assert body["detail"] == "no task has the id '12345': task ids are UUIDs"
    assert await row_counts(pool) == (0, 0)


# --------------------------------------------------------------------------- health


async def test_healthz_and_readyz_with_the_database_up(client: httpx.AsyncClient) -> None:
    health = await client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}

    ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "database": "ok"}


async def test_probes_with_the_database_down(down_client: httpx.AsyncClient) -> None:
    health = await down_client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}

    ready = await down_client.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert ready.json()["status"] == "unavailable"
    for leak in INTERNALS:
        assert leak not in ready.text


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", TASKS, {"type": "echo", "payload": {}}),
        ("GET", TASKS, None),
        ("GET", f"{TASKS}/{uuid.UUID(int=1)}", None),
        ("GET", f"{TASKS}/{uuid.UUID(int=1)}/status", None),
        ("DELETE", f"{TASKS}/{uuid.UUID(int=1)}", None),
    ],
)
async def test_database_down_is_a_503_problem_with_retry_after_and_no_internals(
    down_client: httpx.AsyncClient,
    unreachable_database_url: str,
    method: str,
    path: str,
    body: Any,
) -> None:
    response = await down_client.request(method, path, json=body)

    problem = assert_problem(response, 503)
    assert problem["title"] == "Service Unavailable"
    assert problem["detail"] == "the task store is unavailable; retry shortly"
    assert response.headers["retry-after"] == "1"
    port = unreachable_database_url.rsplit(":", 1)[1].split("/")[0]
    for leak in (unreachable_database_url, port, "Connect", "refused"):
        assert leak not in response.text, response.text


async def test_a_rejected_create_is_a_422_even_with_the_database_down(
    down_client: httpx.AsyncClient,
) -> None:
    # Validation needs no database: it must answer before trying to connect.
    response = await down_client.post(TASKS, json={"type": "nope"})

    assert assert_problem(response, 422)["errors"][0]["loc"] == ["body", "type"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/v1/nothing-here", 404),
        ("PUT", TASKS, 405),
        ("PATCH", f"{TASKS}/{uuid.UUID(int=1)}", 405),
    ],
)
async def test_routing_errors_are_problems(
    client: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    assert_problem(await client.request(method, path), status)


# --------------------------------------------------------------------------- OpenAPI


EXPECTED_OPERATIONS: dict[tuple[str, str], dict[str, str | None]] = {
    # (path, method) -> status -> schema name of the body (None: no schema required)
    (TASKS, "post"): {
        "200": "Task",
        "201": "Task",
        "400": "Problem",  # a body JSON cannot read (not UTF-8, say)
        "401": "Problem",
        "409": "Problem",
        "413": "Problem",
        "415": "Problem",  # a body not declared JSON
        "422": "Problem",
        "503": "Problem",
    },
    (f"{TASKS}/batch", "post"): {
        "201": "TaskBatch",
        "400": "Problem",  # a body JSON cannot read, as on POST /api/v1/tasks
        "401": "Problem",
        "413": "Problem",
        "415": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    # summaries by default, whole tasks with view=full
    (TASKS, "get"): {
        "200": "TaskSummaryPage | TaskPage",
        "401": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    # the named queues: nothing to validate, so no 422
    ("/api/v1/queues", "get"): {
        "200": "QueueList",
        "401": "Problem",
        "503": "Problem",
    },
    ("/api/v1/schedules", "get"): {"200": "ScheduleList", "401": "Problem", "503": "Problem"},
    ("/api/v1/schedules", "post"): {
        "201": "Schedule",
        "400": "Problem",
        "401": "Problem",
        "409": "Problem",
        "413": "Problem",
        "415": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    # a name that breaks the schedule-name rule is a 422
    ("/api/v1/schedules/{name}", "get"): {
        "200": "ScheduleDetail",
        "401": "Problem",
        "404": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/schedules/{name}", "patch"): {
        "200": "Schedule",
        "400": "Problem",
        "401": "Problem",
        "404": "Problem",
        "409": "Problem",
        "413": "Problem",
        "415": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/schedules/{name}", "delete"): {
        "204": None,
        "401": "Problem",
        "404": "Problem",
        "409": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/schedules/{name}/pause", "post"): {
        "200": "Schedule",
        "401": "Problem",
        "404": "Problem",
        "409": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/schedules/{name}/resume", "post"): {
        "200": "Schedule",
        "401": "Problem",
        "404": "Problem",
        "409": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/schedules/{name}/run", "post"): {
        "201": "Task",
        "401": "Problem",
        "404": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    # a name that breaks the queue-name rule is a 422
    ("/api/v1/queues/{name}", "get"): {
        "200": "QueueDetail",
        "401": "Problem",
        "404": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/queues/{name}/pause", "post"): {
        "200": "QueuePaused",
        "400": "Problem",
        "401": "Problem",
        "413": "Problem",
        "415": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/queues/{name}/resume", "post"): {
        "200": "QueueResumed",
        "400": "Problem",
        "401": "Problem",
        "404": "Problem",
        "413": "Problem",
        "415": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    # No 422 for the task id itself: an id that is no UUID matches no route (404); the
    # 422s of the two GETs are for `wait`.
    (f"{TASKS}/{{task_id}}", "get"): {
        "200": "Task",
        "401": "Problem",
        "404": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    # event streams: text/event-stream, no schema to name
    (f"{TASKS}/{{task_id}}/events", "get"): {
        "200": None,
        "401": "Problem",
        "404": "Problem",
        "503": "Problem",
    },
    (f"{TASKS}/events", "get"): {
        "200": None,
        "401": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    (f"{TASKS}/{{task_id}}", "delete"): {
        "200": "Task",
        "202": "Task",
        "401": "Problem",
        "404": "Problem",
        "409": "Problem",
        "503": "Problem",
    },
    (f"{TASKS}/{{task_id}}/status", "get"): {
        "200": "TaskStatusView",
        "401": "Problem",
        "404": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    # bulk actions: an empty filter, a bad status or a missing reason is a 422
    (f"{TASKS}/cancel", "post"): {
        "200": "BulkActionResult",
        "400": "Problem",
        "401": "Problem",
        "413": "Problem",
        "415": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    (f"{TASKS}/retry", "post"): {
        "200": "BulkActionResult",
        "400": "Problem",
        "401": "Problem",
        "413": "Problem",
        "415": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/task-actions", "get"): {
        "200": "TaskActionPage",
        "401": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/task-actions/{action_id}", "get"): {
        "200": "TaskActionView",
        "401": "Problem",
        "404": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    # Webhooks: ids are UUIDs (no 422 where only an id is read).
    ("/api/v1/webhooks", "get"): {"200": "WebhookList", "401": "Problem", "503": "Problem"},
    ("/api/v1/webhooks", "post"): {
        "201": "WebhookWithSecret",
        "400": "Problem",
        "401": "Problem",
        "413": "Problem",
        "415": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/webhooks/{webhook_id}", "get"): {
        "200": "Webhook",
        "401": "Problem",
        "404": "Problem",
        "503": "Problem",
    },
    ("/api/v1/webhooks/{webhook_id}", "patch"): {
        "200": "Webhook",
        "400": "Problem",
        "401": "Problem",
        "404": "Problem",
        "413": "Problem",
        "415": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/webhooks/{webhook_id}", "delete"): {
        "204": None,
        "401": "Problem",
        "404": "Problem",
        "503": "Problem",
    },
    ("/api/v1/webhooks/{webhook_id}/rotate-secret", "post"): {
        "200": "WebhookWithSecret",
        "401": "Problem",
        "404": "Problem",
        "503": "Problem",
    },
    ("/api/v1/webhooks/{webhook_id}/deliveries", "get"): {
        "200": "DeliveryPage",
        "401": "Problem",
        "404": "Problem",
        "422": "Problem",
        "503": "Problem",
    },
    ("/api/v1/webhooks/{webhook_id}/replay-failed", "post"): {
        "200": "ReplayedCount",
        "401": "Problem",
        "404": "Problem",
        "503": "Problem",
    },
    ("/api/v1/webhook-deliveries/{delivery_id}", "get"): {
        "200": "DeliveryDetail",
        "401": "Problem",
        "404": "Problem",
        "503": "Problem",
    },
    ("/api/v1/webhook-deliveries/{delivery_id}/replay", "post"): {
        "200": "Delivery",
        "401": "Problem",
        "404": "Problem",
        "409": "Problem",
        "503": "Problem",
    },
    ("/api/v1/tasks/{task_id}/webhook-deliveries", "get"): {
        "200": "TaskDeliveryList",
        "401": "Problem",
        "404": "Problem",
        "503": "Problem",
    },
    ("/healthz", "get"): {"200": None},
    ("/readyz", "get"): {"200": None, "503": None},
}


@pytest.fixture
async def openapi(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200, response.text
    spec: dict[str, Any] = response.json()
    return spec


def _ref(content: dict[str, Any]) -> str:
    """The schema name a body refers to; ``A | B`` for either of two."""
    schema = content["schema"]
    refs: list[str] = (
        [s["$ref"] for s in schema["anyOf"]] if "anyOf" in schema else [schema["$ref"]]
    )
    assert all(ref.startswith("#/components/schemas/") for ref in refs)
    return " | ".join(ref.removeprefix("#/components/schemas/") for ref in refs)


async def test_openapi_lists_every_endpoint_with_its_schemas_and_errors(
    openapi: dict[str, Any],
) -> None:
    paths = openapi["paths"]
    listed = {(path, method) for path, item in paths.items() for method in item}
    assert listed == set(EXPECTED_OPERATIONS)

    for (path, method), statuses in EXPECTED_OPERATIONS.items():
        operation = paths[path][method]
        assert operation.get("summary"), (path, method)
        responses = operation["responses"]
        assert set(responses) == set(statuses), (path, method, sorted(responses))
        for status, schema in statuses.items():
            assert responses[status].get("description"), (path, method, status)
            if schema is not None:
                # The media type is checked by the test below; any will do here.
                (content,) = responses[status]["content"].values()
                assert _ref(content) == schema, (path, method, status)

    create_op = paths[TASKS]["post"]
    assert create_op["requestBody"]["required"] is True
    assert _ref(create_op["requestBody"]["content"]["application/json"]) == "TaskCreate"
    batch_body = paths[f"{TASKS}/batch"]["post"]["requestBody"]
    assert batch_body["required"] is True
    batch_schema = batch_body["content"]["application/json"]["schema"]
    assert batch_schema["properties"]["tasks"]["items"] == {
        "$ref": "#/components/schemas/TaskCreate"
    }
    assert batch_schema["properties"]["tasks"]["maxItems"] == 1000
    assert batch_schema["additionalProperties"] is False

    params = {p["name"]: p for p in paths[TASKS]["get"]["parameters"]}
    assert set(params) == {
        "status",
        "type",
        "created_after",
        "created_before",
        "limit",
        "cursor",
        "view",
    }
    assert all(p["in"] == "query" for p in params.values())
    assert params["view"]["schema"]["enum"] == ["summary", "full"]
    assert params["view"]["schema"]["default"] == "summary"
    assert params["limit"]["schema"]["minimum"] == 1
    assert params["limit"]["schema"]["maximum"] == 100
    assert params["status"]["schema"]["anyOf"][0]["type"] == "array"
    for path in (f"{TASKS}/{{task_id}}", f"{TASKS}/{{task_id}}/status"):
        for method, operation in paths[path].items():
            task_id, *rest = operation["parameters"]
            # The GETs also take `wait`, capped at TASK_WAIT_MAX (60 s by default).
            if method == "get":
                (wait,) = rest
                assert (wait["name"], wait["in"], wait["required"]) == ("wait", "query", False)
                assert wait["schema"]["anyOf"][0] == {"type": "number", "minimum": 0, "maximum": 60}
            else:
                assert rest == []
            assert (task_id["name"], task_id["in"], task_id["required"]) == (
                "task_id",
                "path",
                True,
            )
            assert task_id["schema"]["format"] == "uuid"

    schemas = openapi["components"]["schemas"]
    assert schemas["TaskCreate"]["additionalProperties"] is False
    assert set(schemas["TaskCreate"]["required"]) == {"type"}
    assert schemas["TaskCreate"]["properties"]["priority"]["maximum"] == 9
    assert set(schemas["Task"]["properties"]) == TASK_KEYS
    assert set(schemas["TaskSummary"]["properties"]) == SUMMARY_KEYS
    assert schemas["TaskSummaryPage"]["properties"]["items"]["items"] == {
        "$ref": "#/components/schemas/TaskSummary"
    }
    assert schemas["TaskPage"]["properties"]["items"]["items"] == {
        "$ref": "#/components/schemas/Task"
    }
    assert set(schemas["TaskStatusView"]["properties"]) == {"id", "status", "updated_at"}
    assert set(schemas["TaskPage"]["properties"]) == {"items", "next_cursor"}
    assert set(schemas["TaskSummaryPage"]["properties"]) == {"items", "next_cursor"}
    assert PROBLEM_KEYS | {"errors"} == set(schemas["Problem"]["properties"])
    assert set(schemas["TaskStatus"]["enum"]) == {
        "NEW",
        "PENDING",
        "PROCESSING",
        "DONE",
        "FAILED",
        "CANCELLED",
    }


# Every error body is sent as application/problem+json; the OpenAPI document must say
# so, or generated clients look for the wrong media type on every 4xx/5xx.
async def test_openapi_documents_error_bodies_as_problem_json(
    openapi: dict[str, Any],
) -> None:
    wrong = []
    for (path, method), statuses in EXPECTED_OPERATIONS.items():
        for status, schema in statuses.items():
            if schema == "Problem":
                content = openapi["paths"][path][method]["responses"][status]["content"]
                if set(content) != {"application/problem+json"}:
                    wrong.append(f"{method.upper()} {path} {status}: {sorted(content)}")
    assert not wrong, "\n".join(wrong)


async def test_docs_page_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "swagger" in response.text.lower()
    assert "/openapi.json" in response.text
