"""The dead-letter watch: a task whose message the broker dead-lettered is sent again.

The decision is one statement (db.execution.requeue_dead_lettered), tested here against
each state a task can be in; then the whole path on a real quorum queue whose
x-delivery-limit RabbitMQ enforces: a message handed back once too often is
dead-lettered, and the consumers' watch sends its task again through the outbox.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aio_pika
import asyncpg
import pytest

from taskbox.broker.settings import BrokerSettings
from taskbox.db import outbox
from taskbox.db.execution import Delivery, requeue_dead_lettered
from taskbox.db.tasks import NewTask, create_task
from tests.integration.helpers_broker import queue_depth, topology
from tests.integration.test_consumer import Stack, eventually, fetch_task, wait_status
from tests.integration.test_delivery_proof import claim


@pytest.fixture
async def stack(service_env: dict[str, str]) -> AsyncIterator[Stack]:
    procs = Stack(service_env)
    yield procs
    await procs.close()


async def published(pool: asyncpg.Pool) -> uuid.UUID:
    """A task the relay has sent: PENDING, its one outbox row published."""
    row = await create_task(pool, NewTask("echo", {"n": 1}, 0, 3))
    async with pool.acquire() as conn, conn.transaction():
        batch = await outbox.claim_batch(conn, 10)
        await outbox.record_publish_outcome(conn, [r["id"] for r in batch.rows], [])
    task_id: uuid.UUID = row["id"]
    assert (await fetch_task(pool, task_id))["status"] == "PENDING"
    return task_id


async def newest_row(pool: asyncpg.Pool, task_id: uuid.UUID) -> int:
    newest: int = await pool.fetchval("SELECT max(id) FROM outbox WHERE task_id = $1", task_id)
    return newest


async def test_a_pending_task_whose_newest_message_died_is_sent_again_once(
    pool: asyncpg.Pool,
) -> None:
    task_id = await published(pool)
    dead = Delivery(task_id, await newest_row(pool, task_id))

    decision = await requeue_dead_lettered(pool, dead)

    assert decision.outbox_id is not None and decision.outbox_id > dead.outbox_id
    row = await fetch_task(pool, task_id)
    assert row["status"] == "NEW"
    kinds = await pool.fetch(
        "SELECT kind, published_at IS NULL AS unpublished FROM outbox WHERE task_id = $1 "
        "ORDER BY id",
        task_id,
    )
    assert [(k["kind"], k["unpublished"]) for k in kinds] == [
        ("task.created", False),
        ("task.retry", True),
    ]
    # The watch's own message redelivered (its ack was lost): nothing more is written.
    again = await requeue_dead_lettered(pool, dead)
    assert (again.outbox_id, again.status) == (None, "NEW")
    assert await newest_row(pool, task_id) == decision.outbox_id


async def test_a_dead_letter_of_an_older_row_needs_nothing(pool: asyncpg.Pool) -> None:
    task_id = await published(pool)
    old = await newest_row(pool, task_id)
    # A newer row was sent since (a replay, say): its message is the way forward.
    await pool.execute(
        "INSERT INTO outbox (task_id, kind, body, published_at) "
        "SELECT $1, 'task.replay', body, now() FROM outbox WHERE id = $2",
        task_id,
        old,
    )
    decision = await requeue_dead_lettered(pool, Delivery(task_id, old))
    assert (decision.outbox_id, decision.status) == (None, "PENDING")


async def test_a_dead_letter_of_a_running_finished_or_missing_task_needs_nothing(
    pool: asyncpg.Pool,
) -> None:
    running = await published(pool)
    await claim(pool, running, "w1")
    decision = await requeue_dead_lettered(pool, Delivery(running, await newest_row(pool, running)))
    assert (decision.outbox_id, decision.status) == (None, "PROCESSING")

    finished = await published(pool)
    await pool.execute("UPDATE tasks SET status = 'DONE' WHERE id = $1", finished)
    decision = await requeue_dead_lettered(
        pool, Delivery(finished, await newest_row(pool, finished))
    )
    assert (decision.outbox_id, decision.status) == (None, "DONE")

    decision = await requeue_dead_lettered(pool, Delivery(uuid.uuid4(), 1))
    assert (decision.outbox_id, decision.status) == (None, None)


async def test_a_message_past_the_quorum_queues_delivery_limit_still_runs_its_task(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    quorum = {"QUEUE_TYPE": "quorum", "QUEUE_DELIVERY_LIMIT": "1"}
    settings = broker_settings.model_copy(
        update={"queue_type": "quorum", "queue_delivery_limit": 1}
    )
    async with topology(settings):
        pass
    relay = await stack.relay(**quorum)
    row = await create_task(pool, NewTask("echo", {"n": 7}, 0, 3))
    task_id: uuid.UUID = row["id"]
    await wait_status(pool, task_id, "PENDING", stack=stack)

    # Consumers that took the message and handed it back, once too often for the limit.
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.queue_name, passive=True)
        for _ in range(10):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            await message.nack(requeue=True)
        else:
            pytest.fail("the delivery limit never dead-lettered the message")
    await eventually(
        lambda: queue_depth(settings, settings.dead_letter_watch_queue),
        lambda depth: depth == 1,
        "the dead letter to reach the watch queue",
        stack=stack,
    )
    assert (await fetch_task(pool, task_id))["status"] == "PENDING"  # nothing would run it

    consumer = await stack.consumer(**quorum)
    done = await wait_status(pool, task_id, "DONE", stack=stack)
    assert done["result"] == {"n": 7}
    await consumer.wait_for("the broker dead-lettered the task's message (delivery_limit)")
    assert await queue_depth(settings, settings.dead_letter_watch_queue) == 0
    # The operators' copy stays where it always was.
    assert await queue_depth(settings, settings.dead_letter_queue) == 1
    assert relay.proc is not None and relay.proc.returncode is None
