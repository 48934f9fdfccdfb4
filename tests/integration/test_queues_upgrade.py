"""Upgrading to named queues (issue 15): a deployment's single queue becomes the
``default`` queue under its current AMQP name, with no message lost and no manual step.

The database starts at the landed schema (migration 0004) with tasks in every state and
the messages an old relay published waiting in the existing AMQP queue; ``taskbox
migrate`` brings it to head, and new processes (CONSUMER_QUEUES unset) drain everything.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from typing import Any

import aio_pika
import asyncpg
import orjson
from alembic import command

from taskbox.broker import messages, topology
from taskbox.broker.pipeline import Message
from taskbox.broker.public import to_aio_pika
from taskbox.broker.settings import BrokerSettings
from taskbox.db.migrations import alembic_config
from taskbox.db.settings import DatabaseSettings
from tests.integration.processes import ServiceProcess, run_command
from tests.integration.test_queues import depth

LANDED = "0004"  # the head before named queues

# SQL as the landed version wrote it: no queue column.
_TASK = """
INSERT INTO tasks (type, payload, status, attempts, lease, worker_id, heartbeat_at,
                   started_at, finished_at, run_at, result)
VALUES ('echo', $1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id
"""
_OUTBOX = """
INSERT INTO outbox (task_id, kind, body, available_at, published_at)
VALUES ($1, $2, $3, $4, $5) RETURNING id
"""


async def landed_state(conn: asyncpg.Connection) -> tuple[dict[str, uuid.UUID], list[Message]]:
    """Tasks in every state, as the landed version leaves them, and the messages its
    relay published that still wait in the queue."""
    tasks: dict[str, uuid.UUID] = {}
    queued: list[Message] = []
    ago = "now() - interval '1 minute'"

    async def task(
        name: str,
        status: str,
        *,
        kind: str = "task.created",
        due: str = "now()",
        published: bool = False,
        in_queue: bool = False,
        attempts: int = 0,
        stale: bool = False,
        run_at: str | None = None,
    ) -> None:
        at = await conn.fetchval(f"SELECT {run_at}") if run_at else None
        finished = (
            await conn.fetchval("SELECT now()")
            if status in ("DONE", "FAILED", "CANCELLED")
            else None
        )
        task_id = await conn.fetchval(
            _TASK,
            {"name": name},
            status,
            attempts,
            attempts,
            "old-consumer" if attempts else None,
            await conn.fetchval(f"SELECT {ago}") if stale else None,
            await conn.fetchval(f"SELECT {ago}") if attempts else None,
            finished,
            at,
            {"done": True} if status == "DONE" else None,
        )
        body = {"task_id": str(task_id), "type": "echo", "priority": 0}
        outbox_id = await conn.fetchval(
            _OUTBOX,
            task_id,
            kind,
            body,
            await conn.fetchval(f"SELECT {due}"),
            await conn.fetchval("SELECT now()") if published else None,
        )
        tasks[name] = task_id
        if in_queue:
            queued.append(
                Message(*messages.encode(outbox_id=outbox_id, kind=kind, body=body, headers={}))
            )

    for n in range(3):
        await task(f"new {n}", "NEW")  # created, its row not published yet
    await task(
        "scheduled",
        "NEW",
        due="now() + interval '2 seconds'",
        run_at="now() + interval '2 seconds'",
    )
    await task("retry", "NEW", kind="task.retry", due="now() + interval '1 second'", attempts=1)
    for n in range(3):
        await task(f"pending {n}", "PENDING", published=True, in_queue=True)
    # its consumer died: the message went back to the queue, the row waits for the rescue
    await task("abandoned", "PROCESSING", published=True, in_queue=True, attempts=1, stale=True)
    await task("done", "DONE", published=True, in_queue=True, attempts=1)  # a duplicate message
    await task("failed", "FAILED", published=True, attempts=3)
    await task("cancelled", "CANCELLED", published=True)
    await task("cancelled early", "CANCELLED")  # cancelled before its row went out
    return tasks, queued


async def test_an_existing_deployment_upgrades_without_losing_a_message(
    database_url: str, service_env: dict[str, str], broker_settings: BrokerSettings
) -> None:
    config = alembic_config(DatabaseSettings(database_url=database_url))
    await asyncio.to_thread(command.downgrade, config, LANDED)
    conn = await asyncpg.connect(database_url)
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )
    try:
        assert await conn.fetchval("SELECT to_regclass('queue_consumers')") is None
        tasks, queued = await landed_state(conn)
        before = {
            row["id"]: dict(row)
            for row in await conn.fetch("SELECT id, status, finished_at, attempts FROM tasks")
        }
    finally:
        await conn.close()
    # The existing queue, declared as the landed version declares it, with its messages.
    connection = await aio_pika.connect(broker_settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await topology.declare(channel, broker_settings)
        for message in queued:
            await declared.exchange.publish(to_aio_pika(message), declared.routing_key)
    assert await depth(broker_settings, broker_settings.queue_name) == len(queued)

    migrated = await run_command("db", ["migrate"], service_env)
    assert migrated.code == 0, migrated

    fast = {"HEARTBEAT_INTERVAL": "1", "TASK_STALE_AFTER": "3", "RESCUE_INTERVAL": "1"}
    relay = await ServiceProcess("relay", service_env).start()
    consumer = await ServiceProcess("consumer", service_env, **fast).start()
    try:
        assert f"consuming from {broker_settings.queue_name} " in consumer.output
        conn = await asyncpg.connect(database_url)
        try:
            rows: list[Any] = []
            for _ in range(300):
                rows = await conn.fetch("SELECT id, status, queue, finished_at FROM tasks")
                if all(r["status"] in ("DONE", "FAILED", "CANCELLED") for r in rows):
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
    finally:
        assert await consumer.stop(signal.SIGTERM) == 0, consumer.output
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
    by_id = {row["id"]: row for row in rows}
    for name, task_id in tasks.items():
        row, old = by_id[task_id], before[task_id]
        assert row["queue"] == "default", name
        if old["status"] in ("DONE", "FAILED", "CANCELLED"):
            assert (row["status"], row["finished_at"]) == (old["status"], old["finished_at"]), name
        else:
            assert row["status"] == "DONE", (name, dict(row), relay.output, consumer.output)
    # Every message consumed from the one queue, which kept its name: nothing was
    # routed to a queue of another name.
    assert await depth(broker_settings, broker_settings.queue_name) == 0
    assert await depth(broker_settings, f"{broker_settings.queue_name}.default") is None
