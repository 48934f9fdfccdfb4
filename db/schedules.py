"""Queries of the schedule aggregate: definitions (code and API), the scheduler's tick
transaction, and what a schedule has fired.

The invariant this module owns: **a schedule tick becomes exactly one task**. It rests
on two things, both here:

1. ``fire_due`` claims due schedules ``FOR UPDATE SKIP LOCKED`` and, in the same
   transaction, inserts each due tick's task (with its outbox row, through
   ``db.tasks.create_schedule_tasks``, the create every task goes through) and moves
   ``next_fire_at`` past those ticks. Commit: the tasks exist and the schedule has moved
   on. Crash or lost connection before the commit: neither happened, and whoever
   schedules next sees the same ticks due. No window creates without advancing, or
   advances without creating.
2. The unique index on ``tasks (schedule_name, schedule_fire_at)``: even a scheduler
   working from a stale read (there is none above, but a future change might add one)
   cannot insert a tick that exists.

Leadership (relay.scheduler) only keeps the other replicas idle; correctness does not
depend on it, which is why two schedulers at once are tested without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from taskbox.db.tasks import NewTask, create_schedule_tasks
from taskbox.runtime import failpoints
from taskbox.schedules.timing import (
    CatchUp,
    InvalidTiming,
    due_fire_times,
    first_fire_time,
    timing_of,
)

SCHEDULE_COLUMNS = (
    "name, task_type, payload, cron, interval_seconds, timezone, priority, queue, "
    "max_attempts, catch_up, paused, source, next_fire_at, created_at, updated_at"
)

# Any constant nothing else in this database uses (db.retention has 0x7A5C_0001);
# pg_locks shows it as an advisory lock with classid 0 and objid 2052849666.
SCHEDULER_LOCK = 0x7A5C_0002


@dataclass(frozen=True, slots=True)
class ScheduleDefinition:
    """What a schedule is, as stored: the timing (exactly one of ``cron`` and
    ``interval_seconds``) and the task each tick creates, with its queue and
    max_attempts already resolved by whoever checked it against the registry."""

    name: str
    task_type: str
    payload: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    interval_seconds: float | None = None
    timezone: str = "UTC"
    priority: int = 0
    queue: str = "default"
    max_attempts: int = 3
    catch_up: CatchUp = "skip"
    paused: bool = False

    def first_fire_at(self, now: datetime) -> datetime:
        return first_fire_time(timing_of(self.cron, self.interval_seconds, self.timezone), now)


def _values(definition: ScheduleDefinition) -> tuple[Any, ...]:
    d = definition
    return (
        d.name,
        d.task_type,
        d.payload,
        d.cron,
        d.interval_seconds,
        d.timezone,
        d.priority,
        d.queue,
        d.max_attempts,
        d.catch_up,
        d.paused,
    )


_INSERT = f"""
INSERT INTO schedules (name, task_type, payload, cron, interval_seconds, timezone, priority,
                       queue, max_attempts, catch_up, paused, source, next_fire_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'api', $12)
ON CONFLICT (name) DO NOTHING
RETURNING {SCHEDULE_COLUMNS}
"""  # noqa: S608 - a constant


async def create_schedule(
    conn: asyncpg.Connection | asyncpg.Pool, definition: ScheduleDefinition, now: datetime
) -> asyncpg.Record | None:
    """Store an API schedule; None when the name is taken (by any schedule)."""
    return await conn.fetchrow(_INSERT, *_values(definition), definition.first_fire_at(now))


# A change of timing starts the schedule afresh from now ($12, computed by the caller);
# anything else leaves the next tick where it was, so an edited payload or priority
# takes effect at the next tick. Code schedules are changed by deploying code only.
_UPDATE = f"""
UPDATE schedules SET task_type = $2, payload = $3, cron = $4, interval_seconds = $5,
    timezone = $6, priority = $7, queue = $8, max_attempts = $9, catch_up = $10, paused = $11,
    next_fire_at = CASE WHEN (cron, interval_seconds, timezone)
                             IS NOT DISTINCT FROM ($4, $5::float8, $6)
                        THEN next_fire_at ELSE $12 END,
    updated_at = now()
WHERE name = $1 AND source = 'api'
RETURNING {SCHEDULE_COLUMNS}
"""  # noqa: S608 - a constant


async def update_schedule(
    conn: asyncpg.Connection | asyncpg.Pool, definition: ScheduleDefinition, now: datetime
) -> asyncpg.Record | None:
    """Replace an API schedule's definition; None when there is no API schedule of
    that name (absent, or declared in code)."""
    return await conn.fetchrow(_UPDATE, *_values(definition), definition.first_fire_at(now))


_GET = f"SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = $1"  # noqa: S608
_LIST = f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name"  # noqa: S608
_DELETE = "DELETE FROM schedules WHERE name = $1 AND source = 'api' RETURNING name"


async def get_schedule(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow(_GET, name)


async def list_schedules(conn: asyncpg.Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(_LIST)
    return rows


async def delete_schedule(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> bool:
    """Delete an API schedule (its tasks stay); False when there is none of that name."""
    return await conn.fetchval(_DELETE, name) is not None


# The last ticks by fire time (the unique index, read backwards) and the last "run now"
# tasks, which have no fire time, by creation.
_RECENT_TICKS = """
(SELECT id, status, schedule_fire_at AS fire_at, created_at FROM tasks
 WHERE schedule_name = $1 AND schedule_fire_at IS NOT NULL
 ORDER BY schedule_fire_at DESC LIMIT $2)
UNION ALL
(SELECT id, status, NULL, created_at FROM tasks
 WHERE schedule_name = $1 AND schedule_fire_at IS NULL
 ORDER BY created_at DESC LIMIT $2)
"""


async def recent_ticks(
    conn: asyncpg.Connection | asyncpg.Pool, name: str, limit: int
) -> list[asyncpg.Record]:
    """The schedule's last ``limit`` ticks and last ``limit`` run-now tasks (fire_at
    NULL), newest first by fire time, then by creation."""
    rows = await conn.fetch(_RECENT_TICKS, name, limit)
    return sorted(rows, key=lambda row: row["fire_at"] or row["created_at"], reverse=True)


def task_of(row: asyncpg.Record | dict[str, Any]) -> NewTask:
    """The task a tick of the schedule ``row`` creates."""
    return NewTask(
        row["task_type"],
        row["payload"],
        row["priority"],
        row["max_attempts"],
        queue=row["queue"],
    )


async def run_now(conn: asyncpg.Connection, row: asyncpg.Record) -> asyncpg.Record:
    """One extra task of the schedule, now; the schedule itself does not move."""
    (task,) = await create_schedule_tasks(conn, task_of(row), row["name"], [None])
    return task


# The claim: due, running schedules, earliest first, each locked for this transaction.
# SKIP LOCKED: a schedule another transaction holds (a scheduler mid-tick, an API edit)
# is left for the next pass instead of waited for. now() is the transaction's start,
# the one clock every fire time is compared with.
_CLAIM_DUE = f"""
SELECT {SCHEDULE_COLUMNS}, now() AS db_now FROM schedules
WHERE NOT paused AND next_fire_at <= now()
ORDER BY next_fire_at
LIMIT $1
FOR UPDATE SKIP LOCKED
"""  # noqa: S608 - a constant
_ADVANCE = "UPDATE schedules SET next_fire_at = $2 WHERE name = $1"
_NEXT_DUE = "SELECT min(next_fire_at) - now() FROM schedules WHERE NOT paused"


@dataclass(frozen=True, slots=True)
class Tick:
    schedule: str
    fire_at: datetime
    task_id: Any  # uuid.UUID


@dataclass(slots=True)
class FireReport:
    created: list[Tick] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # missed ticks left out, by schedule
    claimed: int = 0
    # Schedules whose stored timing no longer reads (a zone the tz database dropped):
    # left as they are, reported, never allowed to stop the others.
    broken: dict[str, str] = field(default_factory=dict)


# Schedules claimed per tick transaction; more due than this are claimed by the next.
FIRE_BATCH = 100


async def fire_due(
    conn: asyncpg.Connection, *, catch_up_max: int, limit: int = FIRE_BATCH
) -> FireReport:
    """Turn every due tick of up to ``limit`` schedules into its task, in one
    transaction with the schedules' advance (see the module docstring)."""
    report = FireReport()
    async with conn.transaction():
        due = await conn.fetch(_CLAIM_DUE, limit)
        report.claimed = len(due)
        for row in due:
            try:
                timing = timing_of(row["cron"], row["interval_seconds"], row["timezone"])
            except InvalidTiming as exc:
                report.broken[row["name"]] = str(exc)
                continue
            ticks = due_fire_times(
                timing, row["next_fire_at"], row["db_now"], row["catch_up"], catch_up_max
            )
            created = await create_schedule_tasks(conn, task_of(row), row["name"], ticks.fire_times)
            report.created += [Tick(row["name"], task["run_at"], task["id"]) for task in created]
            # A kill here leaves the ticks' tasks inserted and the schedule not yet
            # advanced, uncommitted: the fault tests prove neither survives alone.
            failpoints.hit("scheduler.before_advance")
            if ticks.skipped:
                report.skipped[row["name"]] = ticks.skipped
            await conn.execute(_ADVANCE, row["name"], ticks.next_fire_at)
    return report


async def seconds_until_due(conn: asyncpg.Connection) -> float | None:
    """Seconds until the earliest running schedule falls due (<= 0: due now); None
    when no schedule runs."""
    until = await conn.fetchval(_NEXT_DUE)
    return None if until is None else float(until.total_seconds())


# Code schedules: the scheduler writes its task modules' declarations on taking the
# lead. A definition that changed is updated; its next tick moves only when its timing
# changed. An API schedule of the same name is left alone (the caller reports it).
_UPSERT_CODE = """
INSERT INTO schedules (name, task_type, payload, cron, interval_seconds, timezone, priority,
                       queue, max_attempts, catch_up, paused, source, next_fire_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'code', $12)
ON CONFLICT (name) DO UPDATE SET
    task_type = EXCLUDED.task_type, payload = EXCLUDED.payload, cron = EXCLUDED.cron,
    interval_seconds = EXCLUDED.interval_seconds, timezone = EXCLUDED.timezone,
    priority = EXCLUDED.priority, queue = EXCLUDED.queue,
    max_attempts = EXCLUDED.max_attempts, catch_up = EXCLUDED.catch_up,
    paused = EXCLUDED.paused,
    next_fire_at = CASE
        WHEN (schedules.cron, schedules.interval_seconds, schedules.timezone)
             IS NOT DISTINCT FROM (EXCLUDED.cron, EXCLUDED.interval_seconds, EXCLUDED.timezone)
        THEN schedules.next_fire_at ELSE EXCLUDED.next_fire_at END,
    updated_at = now()
WHERE schedules.source = 'code'
    AND (schedules.task_type, schedules.payload, schedules.cron, schedules.interval_seconds,
         schedules.timezone, schedules.priority, schedules.queue, schedules.max_attempts,
         schedules.catch_up, schedules.paused)
        IS DISTINCT FROM
        (EXCLUDED.task_type, EXCLUDED.payload, EXCLUDED.cron, EXCLUDED.interval_seconds,
         EXCLUDED.timezone, EXCLUDED.priority, EXCLUDED.queue, EXCLUDED.max_attempts,
         EXCLUDED.catch_up, EXCLUDED.paused)
"""
_DELETE_UNDECLARED = (
    "DELETE FROM schedules WHERE source = 'code' AND NOT (name = ANY($1::text[])) RETURNING name"
)
_API_NAMES = "SELECT name FROM schedules WHERE source = 'api' AND name = ANY($1::text[])"


@dataclass(frozen=True, slots=True)
class CodeSync:
    removed: list[str]
    clashes: list[str]  # declared in code, but an API schedule has the name


async def sync_code_schedules(
    conn: asyncpg.Connection, declared: Sequence[ScheduleDefinition], now: datetime
) -> CodeSync:
    """Make the code schedules in the table exactly ``declared``, in one transaction."""
    names = [d.name for d in declared]
    async with conn.transaction():
        for definition in declared:
            await conn.execute(_UPSERT_CODE, *_values(definition), definition.first_fire_at(now))
        removed = [row["name"] for row in await conn.fetch(_DELETE_UNDECLARED, names)]
        clashes = [row["name"] for row in await conn.fetch(_API_NAMES, names)]
    return CodeSync(removed, clashes)


@dataclass(frozen=True, slots=True)
class ScheduleSummary:
    """One line of ``taskbox status`` and ``taskbox schedules list``."""

    name: str
    source: str
    task_type: str
    timing: str  # the cron line and its zone, or "every N s"
    paused: bool
    next_fire_at: datetime


_SUMMARIES = (
    "SELECT name, source, task_type, cron, interval_seconds, timezone, paused, next_fire_at"
    " FROM schedules ORDER BY next_fire_at, name"
)
# Who leads: the session holding the scheduler's lock in this database; its
# application_name is taskbox-scheduler:<pid of the relay process>.
_LEADER = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.classid = 0 AND l.objid = $1 AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def summaries(conn: asyncpg.Connection) -> list[ScheduleSummary]:
    """Every schedule, soonest next tick first."""
    found = []
    for row in await conn.fetch(_SUMMARIES):
        if row["cron"] is not None:
            timing = f"cron {row['cron']} ({row['timezone']})"
        else:
            timing = f"every {row['interval_seconds']:g} s"
        found.append(
            ScheduleSummary(
                row["name"],
                row["source"],
                row["task_type"],
                timing,
                row["paused"],
                row["next_fire_at"],
            )
        )
    return found


async def scheduler_leader(conn: asyncpg.Connection) -> str | None:
    """The application_name of the leading scheduler's session, or None when none
    leads (seeing other sessions' names needs pg_read_all_stats or the same role)."""
    name: str | None = await conn.fetchval(_LEADER, SCHEDULER_LOCK)
    return name


_SET_PAUSED = f"""
UPDATE schedules SET paused = $2, updated_at = now() WHERE name = $1 AND source = 'api'
RETURNING {SCHEDULE_COLUMNS}
"""  # noqa: S608 - a constant


async def set_paused(
    conn: asyncpg.Connection | asyncpg.Pool, name: str, paused: bool
) -> asyncpg.Record | None:
    """Pause or resume an API schedule (its next tick stays: on resume, the ticks missed
    meanwhile follow its catch-up policy); None when there is no API schedule ``name``."""
    return await conn.fetchrow(_SET_PAUSED, name, paused)
