"""What the relay shows on its metrics port: the registry, the liveness and readiness
probes, and the loop that keeps the backlog gauges fresh."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from aio_pika.abc import AbstractConnection

from taskbox.db import overview, queues
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.relay.listener import OutboxListener
from taskbox.relay.metrics import RelayMetrics
from taskbox.relay.relay import OutboxRelay
from taskbox.relay.scheduler import Scheduler
from taskbox.relay.settings import RelaySettings
from taskbox.runtime.probes import AttributeCollector, Probes, ReadCounter, ReadGauge
from taskbox.runtime.readiness import broker_check, database_check

log = logging.getLogger(__name__)


async def refresh_backlog(pool: asyncpg.Pool, metrics: RelayMetrics, interval: float) -> None:
    """Set the backlog and per-queue gauges every ``interval`` seconds: a query on the
    unpublished rows' partial index and one on the unfinished tasks (by the status
    index), never anything on the publish path."""
    while True:
        try:
            metrics.record_backlog(await overview.backlog(pool))
            metrics.record_queues(await queues.list_queues(pool))
        except TRANSIENT_DB_ERRORS as exc:
            log.debug("backlog gauges not refreshed: %s", exc)  # /readyz reports the database
        except asyncpg.PostgresError as exc:
            # a database not yet migrated, a role without a grant: monitoring only
            log.warning("backlog gauges not refreshed: %s", exc)
        await asyncio.sleep(interval)


def observe(
    probes: Probes,
    settings: RelaySettings,
    metrics: RelayMetrics,
    pool: asyncpg.Pool,
    connection: AbstractConnection,
    relay: OutboxRelay,
    listener: OutboxListener | None,
    scheduler: Scheduler | None = None,
) -> None:
    """Register the relay's counters and arm its probes (ready to answer from now on)."""
    values: list[ReadCounter | ReadGauge] = [
        ReadCounter(
            "taskbox_relay_published",
            "Outbox rows published and confirmed by the broker.",
            lambda: relay.published_total,
        ),
        ReadCounter(
            "taskbox_relay_publish_refused",
            "Outbox rows the broker refused (nack, return, no confirm); each is retried.",
            lambda: relay.refused_total,
        ),
    ]
    if listener is not None:
        values += [
            ReadCounter(
                "taskbox_relay_listen_reconnects",
                "Times the LISTEN connection was re-established.",
                lambda: listener.reconnects,
            ),
            ReadGauge(
                "taskbox_relay_listen_up",
                "1 while the LISTEN connection is up and passed its last self-check.",
                lambda: float(listener.healthy),
            ),
        ]
    metrics.registry.register(AttributeCollector(values))

    # A drain shows life at least once a poll interval and after every batch; a batch may
    # legitimately take a publish timeout plus a slow statement, twice over on a retry.
    stall = 2 * (
        settings.relay_poll_interval + settings.relay_publish_timeout + settings.db_command_timeout
    )
    probes.watch("drain", lambda: relay.alive_at, within=max(stall, 30.0))
    if scheduler is not None:
        # A candidate beats every SCHEDULER_LEADER_RETRY, a leader every pass; either may
        # wait out a slow statement, or a reconnect's backoff (at most 5 retries' worth).
        retry = settings.scheduler_leader_retry
        stuck = 2 * (settings.db_command_timeout + 5 * retry + settings.scheduler_poll_interval)
        probes.watch("scheduler", lambda: scheduler.alive_at, within=max(stuck, 30.0))
    probes.require("database", database_check(pool))
    probes.require("broker", broker_check(connection))
    if listener is not None:

        async def listening() -> str | None:
            # Not fatal (the poll still publishes, only later), but an operator should know.
            return None if listener.healthy else "LISTEN connection down; polling only"

        probes.require("listen", listening)
    probes.started()
