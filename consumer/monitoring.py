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
    queue: AbstractQueue,
    consumer: TaskConsumer,
) -> None:
    """Register the consumer's scrape-time values and arm its probes."""
    consumer.metrics.registry.register(
        AttributeCollector(
            [
                ReadGauge(
                    "taskbox_consumer_running",
                    "Attempts running in this consumer now.",
                    lambda: consumer.running_count,
                ),
                ReadCounter(
                    "taskbox_consumer_completed",
                    "Attempts this consumer finished and committed (every outcome).",
                    lambda: consumer.completed,
                ),
            ]
        )
    )
    # The claim loop shows life at least every second, or on each retry of a claim
    # while Postgres is away; the heartbeat loop once a HEARTBEAT_INTERVAL, after a
    # statement that may take DB_COMMAND_TIMEOUT.
    slack = settings.db_command_timeout + 10.0
    probes.watch("claim", lambda: consumer.alive_at["claim"], within=slack + 5.0)
    probes.watch(
        "heartbeat",
        lambda: consumer.alive_at["heartbeat"],
        within=2 * settings.heartbeat_interval + slack,
    )
    probes.require("database", database_check(pool))
    probes.require("broker", broker_check(connection))

    async def consuming() -> str | None:
        channel = queue.channel
        return "channel closed" if channel.is_closed else None

    probes.require("channel", consuming)
    probes.started()
