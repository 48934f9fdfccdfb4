"""Task priority end to end: the queue's x-max-priority, publish order, consumer order."""

from __future__ import annotations

import signal

import aio_pika
import asyncpg
import pytest

from taskbox.broker import messages
from taskbox.broker.settings import BrokerSettings
from taskbox.broker.topology import TopologyMismatch, declare
from taskbox.db.tasks import NewTask, create_task
from tests.integration.helpers_broker import queue_depth, take_all
from tests.integration.processes import ServiceProcess, run_command
from tests.integration.test_relay import eventually

# Queued before anything consumes: ten of the lowest priority first, then a 5 and a 9.
PRIORITIES = [0] * 10 + [5, 9]


async def queue_tasks(
    pool: asyncpg.Pool, settings: BrokerSettings, service_env: dict[str, str]
) -> list[str]:
    """Create the tasks (in this order, so in outbox order), let a relay publish them
    all into the queue, and stop it; returns the task ids in creation order."""
    async with pool.acquire() as conn, conn.transaction():
        ids = [
            str((await create_task(conn, NewTask("echo", {"n": n}, priority, 3)))["id"])
            for n, priority in enumerate(PRIORITIES)
        ]
    relay = await ServiceProcess("relay", service_env).start()
    try:

        async def published() -> bool:
            return await queue_depth(settings) == len(ids)

        await eventually(published, 20, f"{len(ids)} messages in the queue")
    finally:
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
    return ids


async def test_the_queue_delivers_higher_priorities_first(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, service_env: dict[str, str]
) -> None:
    ids = await queue_tasks(pool, broker_settings, service_env)
    delivered = await take_all(broker_settings)
    assert [m.priority for m in delivered] == sorted(PRIORITIES, reverse=True)
    # Within one priority, first in first out.
    lowest = [str(messages.parse(m.body).task_id) for m in delivered if m.priority == 0]
    assert lowest == ids[:10]


async def test_a_consumer_runs_the_most_urgent_waiting_task_first(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, service_env: dict[str, str]
) -> None:
    await queue_tasks(pool, broker_settings, service_env)
    # One task at a time, so the order the tasks start is the order delivered.
    consumer = await ServiceProcess(
        "consumer", service_env, CONSUMER_PREFETCH="1", CONSUMER_CONCURRENCY="1"
    ).start()
    try:

        async def all_done() -> bool:
            return not await pool.fetchval("SELECT count(*) FROM tasks WHERE status <> 'DONE'")

        await eventually(all_done, 30, "every task DONE")
    finally:
        assert await consumer.stop(signal.SIGTERM) == 0, consumer.output
    started = await pool.fetch("SELECT priority FROM tasks ORDER BY started_at")
    assert [row["priority"] for row in started] == sorted(PRIORITIES, reverse=True)


async def declare_pre_priority_queue(settings: BrokerSettings) -> None:
    """The task queue as a Taskbox from before priorities declared it."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            settings.queue_name,
            durable=True,
            arguments={
                "x-queue-type": "classic",
                "x-dead-letter-exchange": settings.dead_letter_exchange,
            },
        )


async def test_an_explicit_priority_meeting_a_queue_without_is_refused_with_what_to_do(
    broker_settings: BrokerSettings, service_env: dict[str, str]
) -> None:
    await declare_pre_priority_queue(broker_settings)
    connection = await aio_pika.connect(broker_settings.amqp_url)
    async with connection:
        with pytest.raises(TopologyMismatch, match="rabbitmqctl delete_queue"):
            await declare(await connection.channel(), broker_settings)
    result = await run_command(
        "consumer", [], {**service_env, "QUEUE_MAX_PRIORITY": "9"}, timeout=30
    )
    output = result.stdout + result.stderr
    assert result.code == 2, result
    assert "QUEUE_MAX_PRIORITY" in output and "delete_queue" in output
    # Nothing retried it as if the broker were away.
    assert "cannot reach RabbitMQ" not in output


async def test_an_upgrade_keeps_a_queue_without_priorities_and_says_so(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, service_env: dict[str, str]
) -> None:
    # QUEUE_MAX_PRIORITY unset (the default) meets the queue an older Taskbox made:
    # relay and consumer use it as it is, warn, and tasks still run.
    await declare_pre_priority_queue(broker_settings)
    relay = await ServiceProcess("relay", service_env).start()
    consumer = await ServiceProcess("consumer", service_env).start()
    try:
        task = await create_task(pool, NewTask("echo", {"after": "upgrade"}, 9, 3))

        async def done() -> bool:
            status = await pool.fetchval("SELECT status FROM tasks WHERE id = $1", task["id"])
            return bool(status == "DONE")

        await eventually(done, 30, "the task DONE through the old queue")
    finally:
        assert await consumer.stop(signal.SIGTERM) == 0, consumer.output
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
    for process in (relay, consumer):
        assert "exists without priorities" in process.output, process.output
        assert "NOT honoured" in process.output
    # The queue is still the old one: no x-max-priority was forced onto it.
    connection = await aio_pika.connect(broker_settings.amqp_url)
    async with connection:
        plain = broker_settings.model_copy(update={"queue_max_priority": 0})
        await declare(await connection.channel(), plain)


async def test_priorities_can_be_turned_off(broker_settings: BrokerSettings) -> None:
    plain = broker_settings.model_copy(update={"queue_max_priority": 0})
    connection = await aio_pika.connect(plain.amqp_url)
    async with connection:
        declared = await declare(await connection.channel(), plain)
        assert "x-max-priority" not in (declared.queue.arguments or {})
        # The default (priorities on) now meets a mismatch, as an operator would.
        with pytest.raises(TopologyMismatch):
            await declare(await connection.channel(), broker_settings)


async def test_an_exchange_of_another_type_stops_relay_and_consumer_with_what_to_do(
    broker_settings: BrokerSettings, service_env: dict[str, str]
) -> None:
    connection = await aio_pika.connect(broker_settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(
            broker_settings.exchange_name, aio_pika.ExchangeType.FANOUT, durable=True
        )
        with pytest.raises(TopologyMismatch, match="EXCHANGE_NAME"):
            await declare(await connection.channel(), broker_settings)
    for module in ("relay", "consumer"):
        result = await run_command(module, [], service_env, timeout=30)
        output = result.stdout + result.stderr
        assert result.code == 2, result
        assert "EXCHANGE_NAME" in output and "rabbitmqadmin delete exchange" in output
        # A permanent refusal, not an unreachable broker retried for two minutes.
        assert "cannot reach RabbitMQ" not in output, result
