"""Retention: the relay's housekeeping loop and ``taskbox cleanup``.

Published outbox rows older than OUTBOX_RETENTION are deleted, and finished tasks older
than TASK_RETENTION when that is set (their outbox rows go with them), and the queue
rows of consumers gone for a day. Every relay runs
the loop, but a sweep first takes a Postgres advisory lock without waiting: the
replica that gets it sweeps, the others skip this round. The lock is session-level on a
pooled connection and released after the sweep (and by Postgres if the session dies).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg

from taskbox.db import retention
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.pool import connect
from taskbox.relay.metrics import RelayMetrics
from taskbox.relay.settings import RelaySettings
from taskbox.runtime.durations import format_duration
from taskbox.runtime.queues import PRESENCE_KEPT

log = logging.getLogger(__name__)

# The first sweep waits this long after start, so a fleet restarting together does not
# start with a burst of deletes while it also drains the backlog.
_FIRST_SWEEP_AFTER = 5.0


@dataclass(frozen=True, slots=True)
class SweepReport:
    outbox_deleted: int
    tasks_deleted: int
    seconds: float


async def sweep(
    conn: asyncpg.Connection, settings: RelaySettings, metrics: RelayMetrics | None = None
) -> SweepReport:
    """Delete what retention allows, batch by batch; the caller holds the lock."""
    started = time.monotonic()
    outbox_deleted = tasks_deleted = 0
    async for count in retention.delete_published_outbox(
        conn, settings.outbox_retention, settings.retention_batch
    ):
        outbox_deleted += count
        if metrics is not None:
            metrics.retention_deleted.labels("outbox").inc(count)
    if settings.task_retention is not None:
        async for count in retention.delete_finished_tasks(
            conn, settings.task_retention, settings.retention_batch
        ):
            tasks_deleted += count
            if metrics is not None:
                metrics.retention_deleted.labels("tasks").inc(count)
    try:
        await retention.delete_gone_consumers(conn, PRESENCE_KEPT)
    except asyncpg.PostgresError as exc:
        # Bookkeeping of GET /api/v1/queues: a role without the grant (taskbox roles not
        # rerun after the upgrade) must not stop the relay.
        log.warning("could not forget consumers gone for long: %s", exc)
    return SweepReport(outbox_deleted, tasks_deleted, time.monotonic() - started)


class Housekeeper:
    """Sweeps every RETENTION_INTERVAL when no other relay is sweeping."""

    def __init__(self, settings: RelaySettings, metrics: RelayMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.alive_at = time.monotonic()  # for /healthz
        self.sweeps = 0

    async def sweep_if_free(self) -> SweepReport | None:
        """One sweep, unless another process holds the lock (then None)."""
        # A connection of its own: the advisory lock is held by the session, and pooled
        # connections are handed back without a reset (db.pool), so a lock left on one
        # by an interrupted sweep could outlive the sweep.
        conn = await connect(self._settings)
        try:
            if not await retention.try_lock(conn):
                return None
            return await sweep(conn, self._settings, self._metrics)
        finally:
            await conn.close()

    async def run(self) -> None:
        await asyncio.sleep(min(_FIRST_SWEEP_AFTER, self._settings.retention_interval))
        while True:
            self.alive_at = time.monotonic()
            try:
                report = await self.sweep_if_free()
            except TRANSIENT_DB_ERRORS as exc:
                log.warning("retention sweep failed (%s: %s)", type(exc).__name__, exc)
            else:
                if report is None:
                    log.debug("retention sweep skipped: another relay holds the lock")
                else:
                    self.sweeps += 1
                    if report.outbox_deleted or report.tasks_deleted:
                        log.info(
                            "retention: deleted %d published outbox rows and %d finished "
                            "tasks in %.2fs",
                            report.outbox_deleted,
                            report.tasks_deleted,
                            report.seconds,
                        )
            self.alive_at = time.monotonic()
            await asyncio.sleep(self._settings.retention_interval)


async def cleanup(settings: RelaySettings) -> int:
    """``taskbox cleanup``: one sweep now, waiting for a running one to finish."""
    try:
        conn = await connect(settings)
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        print(f"cannot reach Postgres at DATABASE_URL: {exc}")
        return 1
    try:
        if not await retention.try_lock(conn):
            print("another relay is sweeping right now; waiting for it to finish")
            await retention.lock(conn)
        try:
            report = await sweep(conn, settings)
        finally:
            await retention.unlock(conn)
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        print(f"cleanup failed ({type(exc).__name__}: {exc}); what was deleted stays deleted")
        return 1
    finally:
        await conn.close()
    print(
        f"deleted {report.outbox_deleted:,} published outbox rows older than "
        f"{format_duration(settings.outbox_retention)} (OUTBOX_RETENTION)"
    )
    if settings.task_retention is None:
        print("kept every finished task (TASK_RETENTION is not set)")
    else:
        print(
            f"deleted {report.tasks_deleted:,} finished tasks older than "
            f"{format_duration(settings.task_retention)} (TASK_RETENTION), with their outbox rows"
        )
    print(f"took {report.seconds:.2f}s")
    return 0
