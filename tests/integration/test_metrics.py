"""Metrics and probes of the real processes: the api's /metrics, and the relay's and the
consumer's metrics port (/metrics, /healthz, /readyz)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskbox.broker.settings import BrokerSettings
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, create_task
from tests.integration.processes import ServiceProcess, free_port


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200
    return samples(response.text)


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.1)


async def test_api_counts_created_tasks_by_type(client: httpx.AsyncClient) -> None:
    for type_, payload in [("echo", {}), ("echo", {"a": 1}), ("sha256", {"text": "x"})]:
        response = await client.post("/api/v1/tasks", json={"type": type_, "payload": payload})
        assert response.status_code == 201
    refused = await client.post("/api/v1/tasks", json={"type": "nope", "payload": {}})
    assert refused.status_code == 422
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    scraped = samples(response.text)
    assert value(scraped, "taskbox_api_tasks_created_total", type="echo") == 2
    assert value(scraped, "taskbox_api_tasks_created_total", type="sha256") == 1
    assert ("taskbox_api_tasks_created_total", (("type", "nope"),)) not in scraped
    schema = (await client.get("/openapi.json")).json()
    assert "/metrics" not in schema["paths"]


async def test_relay_metrics_health_and_backlog(
    pool: asyncpg.Pool,
    db_settings: DatabaseSettings,
    service_env: dict[str, str],
    processes: list[ServiceProcess],
) -> None:
    port = free_port()
    relay = await ServiceProcess(
        "relay",
        service_env,
        RELAY_METRICS_PORT=str(port),
        RELAY_BACKLOG_INTERVAL="0.2",
        # Only this test's NOTIFYs wake the relay: rows created without one stay due
        # until the test has locked them, however slow the machine (a short poll let the
        # relay publish them first now and then).
        RELAY_POLL_INTERVAL="60",
    ).start()
    processes.append(relay)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        health = await client.get("/healthz")
        assert (health.status_code, health.json()["status"]) == (200, "ok")
        assert set(health.json()["loops"]) == {"drain", "scheduler"}

        async def ready() -> bool:
            response = await client.get("/readyz")
            return response.status_code == 200

        await until(ready, "relay ready")
        assert (await client.get("/readyz")).json() == {
            "status": "ready",
            "database": "ok",
            "broker": "ok",
            "listen": "ok",
        }

    async with pool.acquire() as conn, conn.transaction():
        for i in range(7):
            await create_task(conn, NewTask("echo", {"i": i}, 0, 3))
    await pool.execute("SELECT pg_notify($1, '')", db_settings.outbox_channel)

    async def published() -> bool:
        return value(await scrape(port), "taskbox_relay_published_total") == 7

    await until(published, "7 rows published, as counted")
    scraped = await scrape(port)
    assert value(scraped, "taskbox_relay_publish_batch_seconds_count") >= 1
    assert value(scraped, "taskbox_relay_listen_up") == 1
    assert value(scraped, "taskbox_relay_listen_reconnects_total") == 0
    assert value(scraped, "process_resident_memory_bytes") > 0

    # Rows the relay cannot claim (another transaction holds them) stay due: a backlog
    # whose lag grows.
    async with pool.acquire() as conn:
        async with conn.transaction():
            for i in range(3):
                await create_task(conn, NewTask("echo", {"late": i}, 0, 3))
        async with conn.transaction():
            await conn.execute("SELECT id FROM outbox WHERE published_at IS NULL FOR UPDATE")

            async def lagging() -> bool:
                scraped = await scrape(port)
                return (
                    value(scraped, "taskbox_outbox_backlog_rows") == 3
                    and value(scraped, "taskbox_outbox_due_rows") == 3
                    and value(scraped, "taskbox_outbox_lag_seconds") >= 1.0
                )

            await until(lagging, "backlog of 3 with a lag over a second")
        await conn.execute("SELECT pg_notify($1, '')", db_settings.outbox_channel)

    async def drained() -> bool:
        scraped = await scrape(port)
        return (
            value(scraped, "taskbox_outbox_backlog_rows") == 0
            and value(scraped, "taskbox_outbox_lag_seconds") == 0
            and value(scraped, "taskbox_relay_published_total") == 10
        )

    await until(drained, "backlog gauges back to 0 once published")


async def test_consumer_metrics_by_outcome(
    pool: asyncpg.Pool,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
    processes: list[ServiceProcess],
) -> None:
    port = free_port()
    fast = {
        "HEARTBEAT_INTERVAL": "0.3",
        "TASK_STALE_AFTER": "1.5",
        "RESCUE_INTERVAL": "0.3",
        "RETRY_BASE_DELAY": "0.05",
        "RETRY_MAX_DELAY": "0.1",
    }
    processes.append(await ServiceProcess("relay", service_env, RELAY_POLL_INTERVAL="0.2").start())
    consumer = await ServiceProcess(
        "consumer", service_env, CONSUMER_METRICS_PORT=str(port), **fast
    ).start()
    processes.append(consumer)
    async with pool.acquire() as conn, conn.transaction():
        for i in range(3):
            await create_task(conn, NewTask("echo", {"i": i}, 0, 3))
        await create_task(conn, NewTask("fail", {"retryable": False}, 0, 3))
        await create_task(conn, NewTask("fail", {"succeed_on_attempt": 2}, 0, 3))
        # A task whose consumer vanished long ago on its last attempt: rescued to FAILED.
        lost = await create_task(conn, NewTask("echo", {"lost": True}, 0, 1))
        await conn.execute(
            "UPDATE tasks SET status = 'PROCESSING', attempts = 1, "
            "heartbeat_at = now() - interval '1 hour' WHERE id = $1",
            lost["id"],
        )
        await conn.execute("UPDATE outbox SET published_at = now() WHERE task_id = $1", lost["id"])
    # A message that is no task, and one that names no task: both dead-lettered.
    connection = await aio_pika.connect(broker_settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(broker_settings.exchange_name)
        for body in (
            b"not json",
            orjson.dumps({"task_id": str(uuid.uuid4()), "type": "echo", "outbox_id": 1}),
        ):
            await exchange.publish(aio_pika.Message(body), routing_key=broker_settings.queue_name)

    async def settled() -> bool:
        scraped = await scrape(port)
        return (
            value(scraped, "taskbox_consumer_tasks_total", type="echo", status="DONE") == 3
            and value(scraped, "taskbox_consumer_tasks_total", type="fail", status="DONE") == 1
            and value(scraped, "taskbox_consumer_rescued_total", status="FAILED") == 1
            and value(scraped, "taskbox_consumer_dead_lettered_total", reason="no_such_task") == 1
        )

    await until(settled, "every outcome counted")
    scraped = await scrape(port)
    assert value(scraped, "taskbox_consumer_tasks_total", type="fail", status="FAILED") == 1
    assert value(scraped, "taskbox_consumer_tasks_total", type="fail", status="RETRY") == 1
    assert value(scraped, "taskbox_consumer_retries_total", type="fail") == 1
    assert value(scraped, "taskbox_consumer_dead_lettered_total", reason="malformed") == 1
    assert value(scraped, "taskbox_consumer_handler_seconds_count", type="echo") == 3
    assert value(scraped, "taskbox_consumer_handler_seconds_count", type="fail") == 3
    # End to end counts final outcomes only: 3 echo DONE; fail: one FAILED, one DONE.
    assert value(scraped, "taskbox_task_end_to_end_seconds_count", type="echo") == 3
    assert value(scraped, "taskbox_task_end_to_end_seconds_count", type="fail") == 2
    assert value(scraped, "taskbox_task_end_to_end_seconds_sum", type="echo") > 0
    assert value(scraped, "taskbox_consumer_running") == 0
    assert value(scraped, "taskbox_consumer_completed_total") == 6

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        health = await client.get("/healthz")
        assert health.status_code == 200, health.text
        assert set(health.json()["loops"]) == {"claim", "heartbeat"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {
            "status": "ready",
            "database": "ok",
            "broker": "ok",
            "channel": "ok",
        }


@pytest.mark.parametrize(
    ("module", "setting"), [("relay", "RELAY_METRICS_PORT"), ("consumer", "CONSUMER_METRICS_PORT")]
)
async def test_a_taken_metrics_port_stops_the_process_with_what_to_do(
    service_env: dict[str, str], module: str, setting: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = ServiceProcess(module, service_env, **{setting: str(port)})
        with pytest.raises(AssertionError, match="exited"):
            await proc.start(timeout=15)
        assert await proc.wait() == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.output
    assert f"set {setting} to a free port, or 0 to turn it off" in proc.output


async def test_metrics_port_zero_serves_nothing(
    service_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    relay = await ServiceProcess("relay", service_env, RELAY_METRICS_PORT="0").start()
    processes.append(relay)
    assert "metrics and health on" not in relay.output
