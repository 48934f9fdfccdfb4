"""What the consumer shows on its metrics port: gauges read at scrape time and the
liveness and readiness probes."""

from __future__ import annotations

import asyncpg
from aio_pika.abc import AbstractConnection, AbstractQueue

from taskbox.consumer.settings import ConsumerSettings
from taskbox.consumer.worker import TaskConsumer
from taskbox.runtime.probes import AttributeCollector, Probes, ReadCounter, ReadGauge
from taskbox.runtime.readiness import broker_check, database_check


def observe(
    probes: Probes,
    settings: ConsumerSettings,
    pool: asyncpg.Pool,
    connection: AbstractConnection,
    served: list[tuple[AbstractQueue, TaskConsumer]],
) -> None:
    """Register the consumer's scrape-time values and arm its probes; ``served`` pairs
    each AMQP queue consumed with the consumer that runs its tasks (they share one
    metrics registry)."""
    consumers = [consumer for _, consumer in served]
    consumer = consumers[0]
    consumer.metrics.registry.register(
        AttributeCollector(
            [
                ReadGauge(
                    "taskbox_consumer_running",
                    "Attempts running in this consumer now.",
                    lambda: sum(c.running_count for c in consumers),
                ),
                ReadCounter(
                    "taskbox_consumer_completed",
                    "Attempts this consumer finished and committed (every outcome).",
                    lambda: sum(c.completed for c in consumers),
                ),
            ]
        )
    )
    # The claim loop shows life at least every second, or on each retry of a claim
    # while Postgres is away; the heartbeat loop once a HEARTBEAT_INTERVAL, after a
    # statement that may take DB_COMMAND_TIMEOUT.
    slack = settings.db_command_timeout + 10.0
    probes.watch("claim", lambda: min(c.alive_at["claim"] for c in consumers), within=slack + 5.0)
    probes.watch(
        "heartbeat",
        lambda: min(c.alive_at["heartbeat"] for c in consumers),
        within=2 * settings.heartbeat_interval + slack,
    )
    probes.require("database", database_check(pool))
    probes.require("broker", broker_check(connection))

    async def consuming() -> str | None:
        closed = any(queue.channel.is_closed for queue, _ in served)
        return "channel closed" if closed else None

    probes.require("channel", consuming)
    probes.started()
