"""POST /api/v1/tasks/batch against the real Postgres: all or nothing, in order, one wake-up."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskbox.api.settings import ApiSettings
from taskbox.runtime import tracing
from tests.integration.conftest import app_client_for

BATCH = "/api/v1/tasks/batch"


async def counts(pool: asyncpg.Pool) -> tuple[int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM tasks) AS tasks, (SELECT count(*) FROM outbox) AS events"
    )
    assert row is not None
    return row["tasks"], row["events"]


def assert_invalid(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    errors: list[dict[str, Any]] = response.json()["errors"]
    return errors


async def test_a_batch_is_stored_in_order_each_task_with_its_outbox_row(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    tasks = [{"type": "echo", "payload": {"n": n}, "priority": n % 10} for n in range(25)]
    response = await client.post(BATCH, json={"tasks": tasks})
    assert response.status_code == 201, response.text
    items = response.json()["items"]
    assert [item["payload"] for item in items] == [{"n": n} for n in range(25)]
    assert [item["priority"] for item in items] == [n % 10 for n in range(25)]
    assert {item["status"] for item in items} == {"NEW"}
    assert await counts(pool) == (25, 25)
    # Outbox ids rise in the order sent, so the relay publishes the batch in that order.
    rows = await pool.fetch("SELECT task_id::text AS task_id FROM outbox ORDER BY id")
    assert [row["task_id"] for row in rows] == [item["id"] for item in items]
    # Each created task reads back as the batch returned it.
    for item in items[:3]:
        assert (await client.get(f"/api/v1/tasks/{item['id']}")).json() == item


async def test_every_task_of_a_batch_continues_the_callers_trace(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    incoming = tracing.new_trace()
    response = await client.post(
        BATCH,
        json={"tasks": [{"type": "echo"}] * 3},
        headers={"traceparent": str(incoming)},
    )
    assert response.status_code == 201
    headers = [row["headers"] for row in await pool.fetch("SELECT headers FROM outbox")]
    parents = [tracing.parse(h["traceparent"]) for h in headers]
    assert len(parents) == 3
    assert all(p is not None and p.trace_id == incoming.trace_id for p in parents)
    # The API's hop is the tasks' parent: a span of its own, one for the whole request.
    assert {p.span_id for p in parents if p is not None} != {incoming.span_id}
    assert len({p.span_id for p in parents if p is not None}) == 1


async def test_one_invalid_task_stores_none_and_every_problem_is_named_by_position(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    tasks: list[Any] = [
        {"type": "echo"},
        {"type": "no-such-type"},  # the service's check
        {"type": "echo", "priority": 11},  # the schema's check
        {"type": "echo", "payload": {"text": "nul\u0000"}},  # storable payload check
        {"type": "echo", "run_at": "2030-01-01T00:00:00"},  # no offset
        {"type": "sleep", "payload": {"seconds": "long"}},  # the payload model's check
        "not an object",
        {"type": "echo", "status": "DONE"},  # unknown field
    ]
    errors = assert_invalid(await client.post(BATCH, json={"tasks": tasks}))
    where = [tuple(error["loc"][:3]) for error in errors]
    assert where == [("body", "tasks", position) for position in range(1, 8)]
    assert errors[0]["type"] == "unknown_task_type"
    assert errors[1]["loc"] == ["body", "tasks", 2, "priority"]
    assert errors[2]["loc"] == ["body", "tasks", 3, "payload", "text"]
    assert errors[3]["type"] == "timezone_aware"
    assert errors[4]["loc"][:5] == ["body", "tasks", 5, "payload", "seconds"]
    assert errors[6]["type"] == "extra_forbidden"
    assert await counts(pool) == (0, 0)


async def test_a_thousand_tasks_are_accepted_and_one_more_is_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    tasks = [{"type": "echo", "payload": {"n": n}} for n in range(1000)]
    ok = await client.post(BATCH, json={"tasks": tasks})
    assert ok.status_code == 201, ok.text
    items = ok.json()["items"]
    assert [item["payload"]["n"] for item in items] == list(range(1000))
    published_order = await pool.fetch(
        "SELECT t.payload FROM outbox AS o JOIN tasks AS t ON t.id = o.task_id ORDER BY o.id"
    )
    assert [row["payload"]["n"] for row in published_order] == list(range(1000))
    too_many = assert_invalid(await client.post(BATCH, json={"tasks": [{"type": "echo"}] * 1001}))
    assert too_many[0]["loc"] == ["body", "tasks"] and too_many[0]["type"] == "too_long"
    assert await counts(pool) == (1000, 1000)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b"", ["body"]),
        (b"[]", ["body"]),
        (b"{}", ["body", "tasks"]),
        (b'{"tasks": []}', ["body", "tasks"]),
        (b'{"tasks": {"type": "echo"}}', ["body", "tasks"]),
        (b'{"tasks": [{"type": "echo"}], "extra": 1}', ["body", "extra"]),
        (b'{"tasks": [', ["body"]),
    ],
)
async def test_a_malformed_batch_is_a_422_naming_the_envelope(
    client: httpx.AsyncClient, pool: asyncpg.Pool, body: bytes, loc: list[str]
) -> None:
    response = await client.post(BATCH, content=body, headers={"content-type": "application/json"})
    errors = assert_invalid(response)
    assert errors[0]["loc"] == loc
    assert await counts(pool) == (0, 0)


async def test_numbers_json_cannot_hold_exactly_are_refused_not_rounded(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    body = b'{"tasks": [{"type": "echo", "payload": {"big": 123456789012345678901234567890}}, 7]}'
    response = await client.post(BATCH, content=body, headers={"content-type": "application/json"})
    errors = assert_invalid(response)
    assert [e["loc"][:4] for e in errors] == [
        ["body", "tasks", 0, "payload"],
        ["body", "tasks", 1],
    ]
    assert await counts(pool) == (0, 0)


async def test_an_idempotency_key_is_refused_rather_than_ignored(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await client.post(
        BATCH, json={"tasks": [{"type": "echo"}]}, headers={"Idempotency-Key": "once"}
    )
    errors = assert_invalid(response)
    assert errors[0]["loc"] == ["header", "idempotency-key"]
    assert await counts(pool) == (0, 0)


async def test_scheduled_tasks_in_a_batch_get_due_outbox_rows(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    run_at = datetime.now(UTC) + timedelta(hours=1)
    tasks = [
        {"type": "echo"},
        {"type": "echo", "run_at": run_at.isoformat()},
        {"type": "echo", "delay_seconds": 60},
    ]
    response = await client.post(BATCH, json={"tasks": tasks})
    assert response.status_code == 201, response.text
    items = response.json()["items"]
    assert items[0]["run_at"] is None
    assert datetime.fromisoformat(items[1]["run_at"]) == run_at
    created = datetime.fromisoformat(items[2]["created_at"])
    assert datetime.fromisoformat(items[2]["run_at"]) - created == timedelta(seconds=60)
    due = {
        str(row["task_id"]): row["due_in"]
        for row in await pool.fetch(
            "SELECT task_id, extract(epoch FROM available_at - now()) AS due_in FROM outbox"
        )
    }
    assert due[items[0]["id"]] <= 0
    assert 3500 < due[items[1]["id"]] <= 3600
    assert 50 < due[items[2]["id"]] <= 60


async def test_a_batch_wakes_the_relay_once(api_settings: ApiSettings, pool: asyncpg.Pool) -> None:
    wake_ups: list[str] = []
    listener = await asyncpg.connect(api_settings.database_url)
    try:
        await listener.add_listener(api_settings.outbox_channel, lambda *args: wake_ups.append(""))
        async with app_client_for(api_settings) as client:
            response = await client.post(BATCH, json={"tasks": [{"type": "echo"}] * 200})
            assert response.status_code == 201
            await asyncio.sleep(0.3)  # notifications arrive asynchronously
    finally:
        await listener.close()
    assert len(wake_ups) == 1
    assert await counts(pool) == (200, 200)


async def test_a_task_is_read_as_the_single_create_reads_it(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    # JSON the parser takes but Postgres cannot store: named by task and field, as the
    # single create names them, rather than refusing the whole body as invalid JSON.
    body = (
        b'{"tasks": [{"type": "echo"}, {"type": "echo", "payload": {"s": "\\ud800"}},'
        b' {"type": "echo", "payload": {"n": NaN}}]}'
    )
    response = await client.post(BATCH, content=body, headers={"content-type": "application/json"})
    errors = assert_invalid(response)
    assert [e["loc"] for e in errors] == [
        ["body", "tasks", 1, "payload", "s"],
        ["body", "tasks", 2, "payload", "n"],
    ]
    single = await client.post(
        "/api/v1/tasks",
        content=b'{"type": "echo", "payload": {"s": "\\ud800"}}',
        headers={"content-type": "application/json"},
    )
    assert assert_invalid(single)[0]["loc"] == ["body", "payload", "s"]
    assert await counts(pool) == (0, 0)


async def test_a_batch_counts_its_tasks_by_type_and_a_refused_one_counts_none(
    client: httpx.AsyncClient,
) -> None:
    tasks = [{"type": "echo"}] * 3 + [{"type": "sha256", "payload": {"text": "x"}}]
    assert (await client.post(BATCH, json={"tasks": tasks})).status_code == 201
    refused = await client.post(BATCH, json={"tasks": [{"type": "echo"}, {"type": "nope"}]})
    assert refused.status_code == 422
    scraped = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families((await client.get("/metrics")).text)
        for sample in family.samples
    }
    assert scraped[("taskbox_api_tasks_created_total", (("type", "echo"),))] == 3
    assert scraped[("taskbox_api_tasks_created_total", (("type", "sha256"),))] == 1
