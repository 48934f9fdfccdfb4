"""W3C traceparent from the API request to the consumer's log lines, and the task
context (task id, outbox id, attempt) on every log line about a task."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from taskbox.broker.settings import BrokerSettings
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, create_task
from taskbox.relay.relay import OutboxRelay, open_broker
from taskbox.relay.settings import RelaySettings
from taskbox.runtime import tracing
from tests.integration.helpers_broker import take_all, topology
from tests.integration.processes import ServiceProcess

INCOMING = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


async def outbox_headers(pool: asyncpg.Pool, task_id: str) -> dict[str, Any]:
    headers: dict[str, Any] = await pool.fetchval(
        "SELECT headers FROM outbox WHERE task_id = $1", uuid.UUID(task_id)
    )
    return headers


async def test_api_continues_the_callers_trace(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await client.post(
        "/api/v1/tasks", json={"type": "echo", "payload": {}}, headers={"traceparent": INCOMING}
    )
    assert response.status_code == 201
    stored = tracing.parse((await outbox_headers(pool, response.json()["id"]))["traceparent"])
    assert stored is not None
    assert stored.trace_id == TRACE_ID
    assert stored.span_id != "00f067aa0ba902b7"  # the API's own hop
    assert stored.flags == "01"


@pytest.mark.parametrize("sent", [None, "garbage", INCOMING.upper()])
async def test_api_starts_a_trace_without_a_valid_one(
    client: httpx.AsyncClient, pool: asyncpg.Pool, sent: str | None
) -> None:
    headers = {"traceparent": sent} if sent is not None else {}
    response = await client.post(
        "/api/v1/tasks", json={"type": "echo", "payload": {}}, headers=headers
    )
    assert response.status_code == 201  # a bad traceparent is ignored, never an error
    stored = tracing.parse((await outbox_headers(pool, response.json()["id"]))["traceparent"])
    assert stored is not None
    assert stored.trace_id != TRACE_ID


async def test_relay_carries_the_trace_onto_the_message_and_logs_refusals_with_ids(
    pool: asyncpg.Pool,
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = RelaySettings(
        **db_settings.model_dump(include={"database_url", "outbox_channel"}),
        **broker_settings.model_dump(),
        relay_retry_base_delay=30,
    )
    async with pool.acquire() as conn:
        task = await create_task(conn, NewTask("echo", {}, 0, 3), {"traceparent": INCOMING})
    connection, publisher = await open_broker(settings)
    try:
        relay = OutboxRelay(pool, publisher, settings, asyncio.Event())
        assert await relay.drain_batch() == 1
        (message,) = await take_all(broker_settings)
        assert message.headers["traceparent"] == INCOMING

        # A refused publish names the task and the outbox row on its log line.
        async with topology(broker_settings) as topo:
            await topo.queue.unbind(topo.exchange, routing_key=topo.routing_key)
            async with pool.acquire() as conn:
                refused = await create_task(conn, NewTask("echo", {}, 0, 3))
            with caplog.at_level(logging.WARNING, logger="taskbox.relay.relay"):
                assert await relay.drain_batch() == 1
    finally:
        await connection.close()
    (record,) = [r for r in caplog.records if r.getMessage().startswith("publish refused")]
    outbox_id = await pool.fetchval("SELECT id FROM outbox WHERE task_id = $1", refused["id"])
    assert (record.task_id, record.outbox_id) == (str(refused["id"]), outbox_id)  # type: ignore[attr-defined]
    assert task["id"] != refused["id"]


async def test_consumer_logs_carry_the_trace_and_the_task_through_a_retry(
    pool: asyncpg.Pool, service_env: dict[str, str]
) -> None:
    relay = await ServiceProcess("relay", service_env, RELAY_POLL_INTERVAL="0.2").start()
    consumer = await ServiceProcess(
        "consumer",
        service_env,
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",
        RETRY_BASE_DELAY="0.05",
        RETRY_MAX_DELAY="0.1",
    ).start()
    try:
        async with pool.acquire() as conn:
            task = await create_task(
                conn,
                NewTask("fail", {"succeed_on_attempt": 2}, 0, 3),
                {"traceparent": INCOMING},
            )
        task_id = str(task["id"])
        deadline = time.monotonic() + 15
        while await pool.fetchval("SELECT status FROM tasks WHERE id = $1", task["id"]) != "DONE":
            assert time.monotonic() < deadline, consumer.output
            await asyncio.sleep(0.05)
        await consumer.wait_for('"attempt committed: DONE"')
    finally:
        for proc in (consumer, relay):
            proc.kill()
            await proc.wait()

    outbox = await pool.fetch(
        "SELECT id, kind, headers FROM outbox WHERE task_id = $1 ORDER BY id", task["id"]
    )
    assert [row["kind"] for row in outbox] == ["task.created", "task.retry"]
    assert outbox[1]["headers"] == {"traceparent": INCOMING}  # the retry keeps the trace
    created_id, retry_id = (row["id"] for row in outbox)

    lines = [orjson.loads(line) for line in consumer.lines if line.startswith("{")]
    about = [line for line in lines if line.get("task_id") == task_id]
    by_message = {line["message"]: line for line in about}
    failed = next(v for k, v in by_message.items() if k.startswith("attempt failed, retrying"))
    retried = by_message["attempt committed: NEW"]
    done = by_message["attempt committed: DONE"]
    assert {k: failed[k] for k in ("outbox_id", "attempt", "trace_id")} == {
        "outbox_id": created_id,
        "attempt": 1,
        "trace_id": TRACE_ID,
    }
    assert (retried["outbox_id"], retried["attempt"]) == (created_id, 1)
    assert {k: done[k] for k in ("outbox_id", "attempt", "trace_id")} == {
        "outbox_id": retry_id,
        "attempt": 2,
        "trace_id": TRACE_ID,
    }
    # Every consumer line about this task carries the task context.
    for line in about:
        assert line["trace_id"] == TRACE_ID, line
        assert "outbox_id" in line, line
