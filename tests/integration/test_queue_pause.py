"""Pausing and resuming a queue (issue 15) against the real Postgres and RabbitMQ.

A paused queue's waiting tasks stay NEW in the outbox (the relay parks their rows), its
scheduled and retried tasks too once due, its consumers take no new messages (what
RabbitMQ holds stays there), running tasks finish, the other queues flow; a resume
publishes the backlog and the consumers take messages again. The pause lives in
Postgres: it survives restarts. Who and why are recorded.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from taskbox.api.settings import ApiSettings
from taskbox.broker import messages
from taskbox.broker.settings import BrokerSettings
from taskbox.db import outbox, queues
from taskbox.db.outbox import claim_batch
from taskbox.db.tasks import NewTask, create_task
from taskbox.runtime.queues import amqp_queue_name
from tests.integration.conftest import app_client_for
from tests.integration.helpers_broker import queue_depth
from tests.integration.processes import ServiceProcess, free_port

KEY = "k-ops-7f3a"
PAUSE_ENV = {
    "TASK_MODULES": "tests.integration.pause_tasks:app",
    "QUEUE_PAUSE_CHECK_INTERVAL": "0.2",
    "API_KEYS": f"ops:{KEY},unnamed-key-2",
    "RELAY_POLL_INTERVAL": "0.2",
}
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def media_queue(broker_settings: BrokerSettings) -> AsyncIterator[str]:
    name = amqp_queue_name(broker_settings.queue_name, "media")
    yield name
    connection = await aio_pika.connect(broker_settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


async def create(client: httpx.AsyncClient, type_: str, n: int, **extra: Any) -> uuid.UUID:
    payload = {"n": n, **extra.pop("payload", {})}
    made = await client.post("/api/v1/tasks", json={"type": type_, "payload": payload, **extra})
    assert made.status_code == 201, made.text
    return uuid.UUID(made.json()["id"])


async def statuses(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    rows = await pool.fetch("SELECT id, status FROM tasks WHERE id = ANY($1::uuid[])", ids)
    return {row["id"]: row["status"] for row in rows}


async def until(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.1)


async def test_a_paused_queue_holds_its_tasks_while_the_others_flow_and_resume_drains_it(
    service_env: dict[str, str],
    broker_settings: BrokerSettings,
    pool: asyncpg.Pool,
    media_queue: str,
) -> None:
    port, relay_metrics, consumer_metrics = free_port(), free_port(), free_port()
    env = {**service_env, **PAUSE_ENV, "RELAY_BACKLOG_INTERVAL": "0.2"}
    api = await ServiceProcess("api", env, API_PORT=str(port)).start()
    relay = await ServiceProcess("relay", env).start()
    general = await ServiceProcess(
        "consumer", env, CONSUMER_QUEUES="default", CONSUMER_METRICS_PORT=str(consumer_metrics)
    ).start()
    media = await ServiceProcess("consumer", env, CONSUMER_QUEUES="media:4").start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as client:
            # Running when the pause comes: one that finishes, one that fails and retries.
            running = await create(client, "render", 0, payload={"seconds": 1.5})
            retried = await create(client, "flaky", 0, payload={"seconds": 1.5})

            async def both_running() -> bool:
                return set((await statuses(pool, [running, retried])).values()) == {"PROCESSING"}

            await until(both_running, 10, "the two media tasks running")

            paused = await client.post("/api/v1/queues/media/pause", json={"reason": "INC-1 test"})
            assert paused.status_code == 200, paused.text
            body = paused.json()
            assert (body["changed"], body["paused"], body["paused_by"]) == (True, True, "ops")
            assert body["pause_reason"] == "INC-1 test"
            again = await client.post("/api/v1/queues/media/pause", json={"reason": "twice"})
            assert again.json()["changed"] is False
            await asyncio.sleep(0.6)  # the consumers' QUEUE_PAUSE_CHECK_INTERVAL, thrice

            waiting = [await create(client, "render", n) for n in range(1, 11)]
            scheduled = await create(client, "render", 11, delay_seconds=1)
            others = [await create(client, "report", n) for n in range(5)]

            async def others_done() -> bool:
                return set((await statuses(pool, others)).values()) == {"DONE"}

            await until(others_done, 15, "the default queue's tasks DONE while media is paused")
            # The running one finished; the failing one went back to NEW for its retry.
            await until(lambda: _is(pool, running, "DONE"), 10, "the running media task finishing")
            await until(lambda: _is(pool, retried, "NEW"), 10, "the failed attempt's retry")
            await asyncio.sleep(2.0)  # the scheduled task and the retry fall due meanwhile
            held = [*waiting, scheduled, retried]
            assert set((await statuses(pool, held)).values()) == {"NEW"}
            parked = await pool.fetchval(
                "SELECT count(*) FROM outbox WHERE task_id = ANY($1::uuid[])"
                " AND published_at IS NULL AND parked_queue = 'media'",
                held,
            )
            assert parked == len(held)
            assert await queue_depth(broker_settings, media_queue) == 0

            # Messages RabbitMQ already holds stay there while paused, even across a
            # consumer restart: the pause lives in Postgres.
            assert await media.stop(signal.SIGTERM) == 0, media.output
            media = await ServiceProcess("consumer", env, CONSUMER_QUEUES="media:4").start()
            await media.wait_for("not consuming from")
            assert await relay.stop(signal.SIGTERM) == 0, relay.output
            relay = await ServiceProcess(
                "relay", env, RELAY_METRICS_PORT=str(relay_metrics)
            ).start()
            # as the relay would have published them before the pause
            in_rabbit = [await _new(pool, "media") for _ in range(3)]
            await _publish_as_the_relay_did(pool, broker_settings, media_queue, in_rabbit)
            await asyncio.sleep(1.5)
            assert await queue_depth(broker_settings, media_queue) == 3
            assert set((await statuses(pool, in_rabbit)).values()) == {"NEW"}

            listed = {q["name"]: q for q in (await client.get("/api/v1/queues")).json()["items"]}
            assert listed["media"]["paused"] is True
            assert listed["media"]["waiting"] == len(held) + 3
            assert listed["default"]["paused"] is False

            # The same per queue on the relay's metrics; completions on the consumer's.
            async def gauges_fresh() -> bool:
                text = await _scrape(relay_metrics)
                return 'taskbox_queue_paused{queue="media"} 1.0' in text and (
                    f'taskbox_queue_waiting_tasks{{queue="media"}} {len(held) + 3}.0' in text
                )

            await until(gauges_fresh, 10, "the relay's per-queue gauges")
            relay_text = await _scrape(relay_metrics)
            assert 'taskbox_queue_paused{queue="default"} 0.0' in relay_text
            # the media consumer before its restart still counts within PRESENCE_WINDOW
            assert re.search(r'taskbox_queue_consumers\{queue="media"\} [12]\.0', relay_text)
            assert f"taskbox_outbox_parked_rows {len(held)}.0" in relay_text
            consumer_text = await _scrape(consumer_metrics)
            assert 'taskbox_consumer_queue_tasks_total{queue="default",status="DONE"} 5.0' in (
                consumer_text
            )

            resumed = await client.post(
                "/api/v1/queues/media/resume",
                json={"reason": "fixed"},
                headers={"Authorization": "Bearer unnamed-key-2"},
            )
            assert resumed.status_code == 200, resumed.text
            assert (resumed.json()["changed"], resumed.json()["unparked"]) == (True, len(held))
            assert resumed.json()["paused"] is False

            every = [*held, *in_rabbit]

            async def all_done() -> bool:
                return set((await statuses(pool, every)).values()) == {"DONE"}

            await until(all_done, 20, "every held media task DONE after the resume")
            published = 'taskbox_relay_queue_published_total{queue="media"} '
            assert published in await _scrape(relay_metrics)
            assert await pool.fetchval("SELECT attempts FROM tasks WHERE id = $1", retried) == 2

            shown = (await client.get("/api/v1/queues/media")).json()
            trail = [(e["action"], e["actor"], e["reason"]) for e in shown["events"]]
            assert trail == [("resume", "key-2", "fixed"), ("pause", "ops", "INC-1 test")]
    finally:
        for process in (media, general, relay):
            assert await process.stop(signal.SIGTERM) == 0, process.output
        assert await api.stop(signal.SIGTERM) in (0, -signal.SIGTERM), api.output
    assert await queue_depth(broker_settings, media_queue) == 0


async def _new(conn: asyncpg.Pool | asyncpg.Connection, queue: str) -> uuid.UUID:
    made = await create_task(conn, NewTask("render", {"n": 1}, 0, 3, queue=queue))
    task_id: uuid.UUID = made["id"]
    return task_id


async def _scrape(port: int) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{port}/metrics")).text


async def _is(pool: asyncpg.Pool, task_id: uuid.UUID, status: str) -> bool:
    return bool(await pool.fetchval("SELECT status = $2 FROM tasks WHERE id = $1", task_id, status))


async def _publish_as_the_relay_did(
    pool: asyncpg.Pool, settings: BrokerSettings, queue: str, task_ids: list[uuid.UUID]
) -> None:
    """Publish the tasks' outbox rows straight to ``queue`` and mark them published: the
    state of messages the relay sent before the pause."""
    rows = await pool.fetch(
        "SELECT id, kind, body, headers FROM outbox WHERE task_id = ANY($1::uuid[]) ORDER BY id",
        task_ids,
    )
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for row in rows:
            encoded = messages.encode(
                outbox_id=row["id"], kind=row["kind"], body=row["body"], headers=row["headers"]
            )
            await channel.default_exchange.publish(
                aio_pika.Message(encoded.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue,
            )
    await pool.execute(
        "UPDATE outbox SET published_at = now(), parked_queue = NULL WHERE id = ANY($1::bigint[])",
        [row["id"] for row in rows],
    )


async def test_rows_a_claim_parks_after_the_resume_committed_go_out_at_the_next_drain(
    pool: asyncpg.Pool,
) -> None:
    """No lock between the relay's claim and a resume: a claim that saw the pause parks
    a row and commits after the resume did. The next drain's claim reports it (a
    resumed queue with parked rows) and the relay unparks it, so it is not parked for
    ever."""
    await _new(pool, "media")
    assert await queues.pause(pool, "media", "test", "race")
    claimer = await pool.acquire()
    try:
        async with claimer.transaction():
            claim = await claim_batch(claimer, 10)
            assert (claim.parked, claim.rows) == (1, [])
            # the resume commits while the claim that parked the row is still open
            assert await queues.resume(pool, "media", "test", "race", "ch") == 0
    finally:
        await pool.release(claimer)
    assert await outbox.resumed_queues(pool) == ["media"]
    async with pool.acquire() as conn, conn.transaction():
        # a backlog's further batches do not ask
        assert (await claim_batch(conn, 10, resumed=False)).resumed == []
        claim = await claim_batch(conn, 10)  # the next drain's first claim
    assert (claim.rows, claim.resumed) == ([], ["media"])
    assert await outbox.unpark(pool, "media", 100) == 1
    assert await outbox.resumed_queues(pool) == []
    async with pool.acquire() as conn, conn.transaction():
        claim = await claim_batch(conn, 10)
    assert (claim.parked, len(claim.rows), claim.resumed) == (0, 1, [])


async def test_a_paused_queue_keeps_its_parked_rows_and_a_resume_is_constant_time(
    pool: asyncpg.Pool,
) -> None:
    """The unpark leaves a queue that is still paused alone (and another resumed queue's
    rows go); the resume itself touches no outbox row, it only counts them."""
    for queue in ("media", "bulk"):
        for _ in range(3):
            await _new(pool, queue)
        assert await queues.pause(pool, queue, "test", "both")
    async with pool.acquire() as conn, conn.transaction():
        assert (await claim_batch(conn, 10)).parked == 6
    assert await outbox.resumed_queues(pool) == []
    async with pool.acquire() as conn, conn.transaction():
        assert (await claim_batch(conn, 10)).resumed == []  # both still paused
    assert await queues.resume(pool, "bulk", "test", "one", "ch") == 3
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE parked_queue IS NOT NULL") == 6
    assert await outbox.resumed_queues(pool) == ["bulk"]
    async with pool.acquire() as conn, conn.transaction():
        assert (await claim_batch(conn, 10)).resumed == ["bulk"]
    assert await outbox.unpark(pool, "media", 100) == 0  # still paused: nothing moves
    assert await outbox.unpark(pool, "bulk", 2) == 2  # a chunk at a time
    assert await outbox.unpark(pool, "bulk", 2) == 1
    parked = await pool.fetch(
        "SELECT DISTINCT parked_queue FROM outbox WHERE parked_queue IS NOT NULL"
    )
    assert [row["parked_queue"] for row in parked] == ["media"]


async def test_resume_sends_the_backlog_in_order_of_due_time(pool: asyncpg.Pool) -> None:
    assert await queues.pause(pool, "media", "test", "order")
    made = []
    async with pool.acquire() as conn:
        for delay in (0.3, 0.0, 0.2, 0.1):
            task_id = await _new(conn, "media")
            await conn.execute(
                "UPDATE outbox SET available_at = now() - make_interval(secs => $2)"
                " WHERE task_id = $1",
                task_id,
                10 - delay,
            )
            made.append((10 - delay, task_id))
    async with pool.acquire() as conn, conn.transaction():
        assert (await claim_batch(conn, 10)).parked == 4
    assert await queues.resume(pool, "media", "test", "order", "ch") == 4
    assert await outbox.unpark(pool, "media", 100) == 4
    async with pool.acquire() as conn, conn.transaction():
        claim = await claim_batch(conn, 10)
    assert [row["task_id"] for row in claim.rows] == [t for _, t in sorted(made, reverse=True)]


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/api/v1/queues/Media/pause", {"reason": "x"}, "name"),
        ("/api/v1/queues/media/pause", {}, "reason"),
        ("/api/v1/queues/media/pause", {"reason": "  "}, "reason"),
        ("/api/v1/queues/media/pause", {"reason": "a\nforged line"}, "reason"),
        ("/api/v1/queues/media/resume", {"reason": "x" * 501}, "reason"),
        ("/api/v1/queues/media/pause", {"reason": "x", "by": "me"}, "by"),
    ],
)
async def test_a_bad_pause_or_resume_is_a_422_naming_the_field(
    api_settings: ApiSettings, path: str, body: dict[str, Any], where: str
) -> None:
    async with app_client_for(api_settings) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert where in response.text


async def test_showing_a_queue_not_in_use_is_a_404(api_settings: ApiSettings) -> None:
    async with app_client_for(api_settings) as client:
        response = await client.get("/api/v1/queues/nothing-here")
        resumed = await client.post("/api/v1/queues/nothing-here/resume", json={"reason": "x"})
    assert response.status_code == 404
    assert "nothing-here" in response.json()["detail"]
    assert resumed.status_code == 404


async def test_resuming_a_queue_not_in_use_answers_200(api_settings: ApiSettings) -> None:
    """A queue paused before anything used it, then resumed, is shown empty with its
    events (not a 404 for a resume that succeeded)."""
    async with app_client_for(api_settings) as client:
        paused = await client.post("/api/v1/queues/later/pause", json={"reason": "ahead"})
        resumed = await client.post("/api/v1/queues/later/resume", json={"reason": "back"})
        shown = await client.get("/api/v1/queues/later")
    assert paused.status_code == 200 and paused.json()["paused"] is True, paused.text
    assert resumed.status_code == 200, resumed.text
    assert (resumed.json()["changed"], resumed.json()["waiting"]) == (True, 0)
    assert shown.status_code == 200
    assert [e["action"] for e in shown.json()["events"]] == ["resume", "pause"]
