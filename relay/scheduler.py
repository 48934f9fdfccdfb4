"""The scheduler: one relay at a time turns schedule ticks into tasks.

Every relay is a candidate. A candidate opens a dedicated connection (outside the pool:
the lock belongs to the session) and tries ``pg_try_advisory_lock`` every
SCHEDULER_LEADER_RETRY seconds; the one that gets it leads. Postgres releases a session
lock when the session ends, so a leader killed with SIGKILL, or whose backend is
terminated, frees the lock at once and the next candidate to try takes over within
SCHEDULER_LEADER_RETRY. A leader cut off by the network is dropped by the server's TCP
keepalives (set on the session below, about SCHEDULER_LEADER_RETRY * 5).

The leader fires due ticks on that same connection (db.schedules.fire_due): a leader
whose session is gone cannot commit anything, and a second leader, should two ever
overlap, still cannot duplicate a tick (db.schedules says why). Leadership is about
not doing the work N times, not about correctness.

On taking the lead it writes the schedules declared in its task modules (code
schedules) to the table, so the newest deployment's declarations win once it leads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from taskbox.db import schedules
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.pool import connect
from taskbox.db.schedules import ScheduleDefinition
from taskbox.relay.metrics import RelayMetrics
from taskbox.relay.settings import RelaySettings
from taskbox.runtime.backoff import backoff_delay
from taskbox.tasktypes import Periodic, TaskRegistry

log = logging.getLogger(__name__)

# Failures after which a candidate starts over with a new session. PostgresError
# covers a terminated backend (AdminShutdown) and a server restarting.
_SESSION_LOST: tuple[type[BaseException], ...] = (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError)


class InvalidCodeSchedule(ValueError):
    """A schedule declared in code that cannot run: unknown type, payload, queue."""


def declared_schedules(
    registry: TaskRegistry, default_max_attempts: int
) -> list[ScheduleDefinition]:
    """The registry's code schedules as stored rows, checked against its task types as
    the api checks an API schedule; InvalidCodeSchedule names the first bad one."""
    return [
        definition_of(periodic, registry, default_max_attempts) for periodic in registry.schedules()
    ]


def definition_of(
    periodic: Periodic, registry: TaskRegistry, default_max_attempts: int
) -> ScheduleDefinition:
    where = f"schedule {periodic.name!r}"
    task_type = registry.get(periodic.task_type)
    if task_type is None:
        raise InvalidCodeSchedule(f"{where}: no task type {periodic.task_type!r} is registered")
    try:
        payload = task_type.parse_payload(periodic.payload).model_dump(mode="json", by_alias=True)
    except ValueError as exc:
        raise InvalidCodeSchedule(f"{where}: invalid payload: {exc}") from None
    queue = periodic.queue or task_type.queue
    if queue not in task_type.queues:
        raise InvalidCodeSchedule(f"{where}: type {task_type.name!r} does not run in {queue!r}")
    timing = periodic.timing
    cron_line = getattr(timing, "expression", None)
    return ScheduleDefinition(
        name=periodic.name,
        task_type=periodic.task_type,
        payload=payload,
        cron=cron_line,
        interval_seconds=getattr(timing, "seconds", None),
        timezone=getattr(timing, "timezone", "UTC"),
        priority=periodic.priority,
        queue=queue,
        max_attempts=periodic.max_attempts or task_type.max_attempts or default_max_attempts,
        catch_up=periodic.catch_up,
    )


class Scheduler:
    def __init__(
        self,
        settings: RelaySettings,
        declared: Sequence[ScheduleDefinition],
        wake_relay: asyncio.Event,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._declared = list(declared)
        self._wake_relay = wake_relay
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.leading = False
        self.alive_at = time.monotonic()  # for /healthz
        self.terms = 0  # how often this process took the lead
        self._broken_reported: set[str] = set()

    def _keepalives(self) -> dict[str, str]:
        # The server drops a silent leader's session (and so its lock) after about
        # idle + interval * count seconds: the bound on a partitioned leader.
        retry = max(1, round(self._settings.scheduler_leader_retry))
        return {
            "tcp_keepalives_idle": str(retry * 2),
            "tcp_keepalives_interval": str(retry),
            "tcp_keepalives_count": "3",
            # pg_stat_activity shows which relay process leads
            "application_name": f"taskbox-scheduler:{os.getpid()}",
        }

    async def run(self) -> None:
        """Be a candidate, lead when elected, start over whenever the session is lost.
        Never returns; a bug (anything but a lost session) ends it for supervise()."""
        failures = 0
        while True:
            self.alive_at = time.monotonic()
            try:
                conn = await connect(self._settings, self._keepalives())
            except _SESSION_LOST as exc:
                failures += 1
                delay = backoff_delay(failures, 0.2, self._settings.scheduler_leader_retry * 5)
                log.warning("scheduler cannot connect (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            try:
                await self._campaign(conn)
            except _SESSION_LOST as exc:
                if self.leading:
                    log.warning(
                        "scheduler lost its session, and the lead (%s: %s)", type(exc).__name__, exc
                    )
                else:
                    log.warning("scheduler candidate lost its session (%s)", type(exc).__name__)
            finally:
                self._step_down()
                conn.terminate()
            await asyncio.sleep(min(1.0, self._settings.scheduler_leader_retry))

    async def _campaign(self, conn: asyncpg.Connection) -> None:
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", schedules.SCHEDULER_LOCK):
            self.alive_at = time.monotonic()
            await asyncio.sleep(self._settings.scheduler_leader_retry)
        self.leading = True
        self.terms += 1
        self.metrics.scheduler_leader.set(1)
        log.info("scheduler: this relay leads (backend pid %s)", conn.get_server_pid())
        await self._write_code_schedules(conn)
        await self._lead(conn)

    def _step_down(self) -> None:
        self.leading = False
        self.metrics.scheduler_leader.set(0)

    async def _write_code_schedules(self, conn: asyncpg.Connection) -> None:
        sync = await schedules.sync_code_schedules(conn, self._declared, datetime.now(UTC))
        if sync.removed:
            log.info("schedules no longer declared in code, deleted: %s", ", ".join(sync.removed))
        for name in sync.clashes:
            log.error(
                "schedule %r is declared in code, but an API schedule has the name: the API "
                "schedule stays and the code one does not run; rename one of them",
                name,
            )

    async def _lead(self, conn: asyncpg.Connection) -> None:
        poll = self._settings.scheduler_poll_interval
        while True:
            self.alive_at = time.monotonic()
            report = await schedules.fire_due(
                conn, catch_up_max=self._settings.schedule_catch_up_max
            )
            if report.created:
                self._wake_relay.set()  # their outbox rows are due now
                self.metrics.schedule_ticks.labels("created").inc(len(report.created))
                log.debug("scheduler created %d tick tasks", len(report.created))
            for name, skipped in report.skipped.items():
                self.metrics.schedule_ticks.labels("skipped").inc(skipped)
                log.warning("schedule %r: %d missed ticks skipped (catch-up policy)", name, skipped)
            for name, error in report.broken.items():
                if name not in self._broken_reported:  # once, not on every pass
                    log.error("schedule %r cannot fire: %s", name, error)
            self._broken_reported = set(report.broken)
            if report.claimed >= schedules.FIRE_BATCH and len(report.broken) < report.claimed:
                continue  # a full claim may have left due schedules behind
            until = await schedules.seconds_until_due(conn)
            # Wake at the next tick, and at least every poll interval: an API edit or a
            # new schedule may fall due sooner than anything seen now. A broken schedule
            # stays due for ever: with one about, the poll interval paces the loop.
            wait = poll if until is None else min(poll, max(0.0, until))
            await asyncio.sleep(poll if report.broken else wait)
