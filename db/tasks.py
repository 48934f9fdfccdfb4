"""Queries of the task aggregate: create (with its outbox row), read, list, cancel.

Each function takes the caller's connection, so a caller can combine calls in its own
transaction. Status guards come from :mod:`db.states`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from taskbox.db.sql import Parameters
from taskbox.db.states import TaskStatus
from taskbox.runtime.queues import DEFAULT_QUEUE

TASK_COLUMNS = (
    "id, type, payload, status, priority, attempts, max_attempts, result, error, "
    "cancel_requested, worker_id, created_at, updated_at, started_at, finished_at, heartbeat_at, "
    "run_at, queue"
)


def _with_created_events(
    insert_tasks: str, headers: str, *, inputs: str = "", joined: str = ""
) -> str:
    """``insert_tasks`` (an INSERT INTO tasks ... RETURNING the task columns) and a
    ``task.created`` outbox row for each task it inserts, as one statement.

    One statement, so one implicit transaction and one round trip: the tasks and the
    events that will run them are committed together or not at all. A scheduled task's
    row falls due at its ``run_at``; the task stays NEW until the relay publishes it. A
    moment in the past is due at once but does not jump the queue.

    ``inputs``, if given, is a first query ``i`` that ``insert_tasks`` reads, and
    ``joined`` joins it to each inserted task, for headers that differ by task.
    """
    first = f"i AS ({inputs}),\n" if inputs else ""
    return f"""
WITH {first}task AS (
    {insert_tasks}
    RETURNING {TASK_COLUMNS}
), event AS (
    INSERT INTO outbox (task_id, kind, body, headers, available_at)
    SELECT task.id, 'task.created',
           jsonb_build_object('task_id', task.id, 'type', task.type, 'priority', task.priority),
           {headers}, greatest(task.run_at, now())
    FROM task {joined}
)
SELECT {TASK_COLUMNS} FROM task
"""  # noqa: S608 - every fragment is a constant


def _insert_with_outbox(*, keyed: bool) -> str:
    """One task: headers $5, scheduled by ``run_at`` $6 or ``delay`` $7 seconds from
    the database's clock, in queue $8, its outcome posted to ``callback_url`` $9.

    The keyed variant inserts nothing (and so writes no outbox row) when the idempotency
    key $10 is taken (it stores the request's digest $11 with the key); a concurrent
    insert with the key waits on the first's index entry and, once that commits, finds
    the conflict too.
    """
    columns, values, on_conflict = "", "", ""
    if keyed:
        columns, values = ", idempotency_key, request_digest", ", $10, $11"
        on_conflict = "ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
    insert = f"""INSERT INTO tasks (type, payload, priority, max_attempts, run_at, queue,
                       callback_url{columns})
    VALUES ($1, $2, $3, $4,
            coalesce($6::timestamptz, now() + make_interval(secs => $7::float8)), $8,
            $9{values})
    {on_conflict}"""  # noqa: S608 - every fragment is a constant
    return _with_created_events(insert, "$5")


_INSERT_TASK_WITH_OUTBOX = _insert_with_outbox(keyed=False)
_INSERT_KEYED_TASK_WITH_OUTBOX = _insert_with_outbox(keyed=True)

# Many tasks: the columns arrive as arrays and are unnested together. Postgres inserts
# the rows in the order unnest yields them and RETURNING hands them on in that order,
# so the outbox rows (and their ids, which set the publish order) and the result follow
# the request's order without a sort; the tests hold it to that. Every row of a batch
# carries the same headers $7 (the batch request's trace context), sent once.
_INSERT_TASKS_WITH_OUTBOX = _with_created_events(
    """INSERT INTO tasks (type, payload, priority, max_attempts, run_at, queue, callback_url)
    SELECT type, payload, priority, max_attempts,
           coalesce(run_at, now() + make_interval(secs => delay)), queue, callback_url
    FROM unnest($1::text[], $2::jsonb[], $3::int2[], $4::int4[], $5::timestamptz[],
                $6::float8[], $7::text[], $8::text[])
        AS i(type, payload, priority, max_attempts, run_at, delay, queue, callback_url)""",
    "$9",
)

# Concurrent single creates grouped by the api (api.grouping): like a batch, but each
# task has its own headers (its request's trace context). The ids come from the api so
# that each outbox row finds its task's headers by id.
_INSERT_GROUP_WITH_OUTBOX = _with_created_events(
    """INSERT INTO tasks (id, type, payload, priority, max_attempts, run_at, queue,
                       callback_url)
    SELECT id, type, payload, priority, max_attempts,
           coalesce(run_at, now() + make_interval(secs => delay)), queue, callback_url
    FROM i""",
    "i.headers",
    inputs="""SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], $4::int2[], $5::int4[],
                        $6::timestamptz[], $7::float8[], $8::text[], $9::text[], $10::jsonb[])
        AS i(id, type, payload, priority, max_attempts, run_at, delay, queue, callback_url,
             headers)""",
    joined="JOIN i ON i.id = task.id",
)

# The tasks of one schedule's ticks: one row per fire time $7, each keyed by (schedule
# name $6, fire time) and due at its fire time. The unique index uq_tasks_schedule_tick
# makes a tick's task exist at most once: a tick inserted before (by a scheduler that
# lost its leadership, or one whose commit was lost with the answer) is skipped, not
# duplicated. A NULL fire time is a "run now": it takes no tick's key and runs at once.
_INSERT_SCHEDULED_TASKS_WITH_OUTBOX = _with_created_events(
    """INSERT INTO tasks (type, payload, priority, max_attempts, run_at, queue,
                       schedule_name, schedule_fire_at)
    SELECT $1, $2, $3, $4, fire_at, $5, $6, fire_at
    FROM unnest($7::timestamptz[]) AS i(fire_at)
    ON CONFLICT (schedule_name, schedule_fire_at) WHERE schedule_name IS NOT NULL DO NOTHING""",
    "$8",
)

_GET_BY_KEY = f"SELECT {TASK_COLUMNS}, request_digest FROM tasks WHERE idempotency_key = $1"  # noqa: S608
_GET_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1"  # noqa: S608
_GET_STATUS = "SELECT id, status, updated_at FROM tasks WHERE id = $1"

# A task cancelled before it was published keeps its outbox row: the relay's claim
# closes it unsent once due (see db.outbox), so cancelling never touches the outbox,
# and the api needs no right to delete outbox rows.
#
# The cancel is cancel_task() of migration 0004: NEW/PENDING become CANCELLED,
# PROCESSING gets cancel_requested, anything else is left alone (db.states.CANCEL_NOW
# and CANCEL_LATER, written out there). It runs as the tables' owner, so the api role
# may cancel without any UPDATE right on tasks, and so without any other status change.
_CANCEL = f"SELECT {TASK_COLUMNS} FROM cancel_task($1)"  # noqa: S608 - a constant


@dataclass(frozen=True, slots=True)
class NewTask:
    type: str
    payload: dict[str, Any]
    priority: int
    max_attempts: int
    run_at: datetime | None = None  # a moment (timezone-aware) before which it must not run
    delay: float | None = None  # or seconds from now, by the database's clock
    queue: str = DEFAULT_QUEUE  # the Taskbox queue it is routed to (checked by the caller)
    callback_url: str | None = None  # where its outcome is posted (checked by the caller)


async def create_task(
    conn: asyncpg.Connection | asyncpg.Pool,
    task: NewTask,
    headers: dict[str, Any] | None = None,
) -> asyncpg.Record:
    """Insert a task (status NEW) and its ``task.created`` outbox row atomically."""
    row = await conn.fetchrow(
        _INSERT_TASK_WITH_OUTBOX,
        task.type,
        task.payload,
        task.priority,
        task.max_attempts,
        headers or {},
        task.run_at,
        task.delay,
        task.queue,
        task.callback_url,
    )
    assert row is not None
    return row


async def create_tasks(
    conn: asyncpg.Connection | asyncpg.Pool,
    tasks: Sequence[NewTask],
    headers: dict[str, Any],
) -> list[asyncpg.Record]:
    """Insert all ``tasks`` (each with its outbox row, all with ``headers``) in one
    statement, so one transaction: all of them or none. Rows come back in the order
    given."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _INSERT_TASKS_WITH_OUTBOX, *_columns(tasks), headers
    )
    return rows


def _columns(tasks: Sequence[NewTask]) -> tuple[list[Any], ...]:
    """The tasks' fields as the arrays the many-task inserts unnest, in their order."""
    return (
        [task.type for task in tasks],
        [task.payload for task in tasks],
        [task.priority for task in tasks],
        [task.max_attempts for task in tasks],
        [task.run_at for task in tasks],
        [task.delay for task in tasks],
        [task.queue for task in tasks],
        [task.callback_url for task in tasks],
    )


async def create_group(
    conn: asyncpg.Connection | asyncpg.Pool,
    tasks: Sequence[tuple[NewTask, dict[str, Any]]],
) -> list[asyncpg.Record]:
    """Insert each task with its own headers (and its outbox row) in one statement, so
    one transaction: all of them or none. Rows come back in the order given."""
    ids = [uuid.uuid4() for _ in tasks]
    rows = await conn.fetch(
        _INSERT_GROUP_WITH_OUTBOX,
        ids,
        *_columns([task for task, _ in tasks]),
        [headers for _, headers in tasks],
    )
    by_id = {row["id"]: row for row in rows}
    return [by_id[task_id] for task_id in ids]


async def create_schedule_tasks(
    conn: asyncpg.Connection,
    task: NewTask,
    schedule_name: str,
    fire_times: Sequence[datetime | None],
    headers: dict[str, Any] | None = None,
) -> list[asyncpg.Record]:
    """Insert a task (with its outbox row, as every create) for each tick of
    ``schedule_name`` at ``fire_times`` that has none yet; None is a "run now" task.
    Returns the tasks inserted, in no particular order. ``task.run_at`` and
    ``task.delay`` are ignored: a tick's task is due at its fire time."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _INSERT_SCHEDULED_TASKS_WITH_OUTBOX,
        task.type,
        task.payload,
        task.priority,
        task.max_attempts,
        task.queue,
        schedule_name,
        list(fire_times),
        headers or {},
    )
    return rows


def request_digest(task: NewTask) -> bytes:
    """A fingerprint of what a keyed create asked for (type, payload, priority,
    max_attempts, a queue other than the default, a callback_url), stored with the key: a repeat is
    compared with the request as first accepted, not with the row, which an operator's
    replay may have changed since."""
    asked: list[Any] = [task.type, task.payload, task.priority, task.max_attempts]
    if task.queue != DEFAULT_QUEUE:
        # Only a named queue joins the digest: a digest stored before queues existed
        # (every such task is in the default queue) still matches its repeat.
        asked.append(task.queue)
    if task.callback_url is not None:
        # Likewise only when given: digests of tasks without one stay as they were.
        asked.append({"callback_url": task.callback_url})
    canonical = orjson.dumps(asked, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).digest()


async def create_task_once(
    conn: asyncpg.Connection | asyncpg.Pool,
    task: NewTask,
    headers: dict[str, Any],
    idempotency_key: str,
) -> tuple[asyncpg.Record, bool]:
    """Create the task unless one with ``idempotency_key`` exists.

    Returns the task and whether this call created it; a task found by its key carries
    its ``request_digest`` too (NULL for one keyed before digests were stored).
    """
    for _ in range(3):  # the holder of the key may vanish in between (retention)
        row = await conn.fetchrow(
            _INSERT_KEYED_TASK_WITH_OUTBOX,
            task.type,
            task.payload,
            task.priority,
            task.max_attempts,
            headers,
            task.run_at,
            task.delay,
            task.queue,
            task.callback_url,
            idempotency_key,
            request_digest(task),
        )
        if row is not None:
            return row, True
        existing = await conn.fetchrow(_GET_BY_KEY, idempotency_key)
        if existing is not None:
            return existing, False
    raise RuntimeError("idempotency key kept conflicting with a task that does not exist")


async def get_task(
    conn: asyncpg.Connection | asyncpg.Pool, task_id: uuid.UUID
) -> asyncpg.Record | None:
    return await conn.fetchrow(_GET_TASK, task_id)


async def get_status(
    conn: asyncpg.Connection | asyncpg.Pool, task_id: uuid.UUID
) -> asyncpg.Record | None:
    return await conn.fetchrow(_GET_STATUS, task_id)


@dataclass(frozen=True, slots=True)
class CancelOutcome:
    """``task`` is None when no such task exists; ``changed`` False when it was terminal."""

    task: asyncpg.Record | None
    changed: bool


async def cancel_task(conn: asyncpg.Connection | asyncpg.Pool, task_id: uuid.UUID) -> CancelOutcome:
    """NEW/PENDING become CANCELLED at once; PROCESSING is flagged ``cancel_requested``."""
    row = await conn.fetchrow(_CANCEL, task_id)
    if row is not None:
        return CancelOutcome(row, True)
    return CancelOutcome(await get_task(conn, task_id), False)


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[asyncpg.Record]
    has_more: bool


@dataclass(frozen=True, slots=True)
class TaskFilter:
    statuses: Sequence[TaskStatus] = ()
    type: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


# What a listing shows of each task: everything but the payload and the result, which
# are unbounded in number across a page (up to MAX_BODY_BYTES and MAX_RESULT_BYTES each)
# and which only GET /api/v1/tasks/{id} and the budgeted full listing return. The error
# stays: its message is cut at 2,000 characters (consumer.attempt.error_of).
SUMMARY_COLUMNS = (
    "id, type, status, priority, attempts, max_attempts, error, cancel_requested, "
    "created_at, updated_at, started_at, finished_at, run_at, queue"
)


# Each filter maps to a fixed SQL fragment and its values travel as parameters, so
# nothing a client sends is ever spliced into the statement text.
def _page_conditions(
    filters: TaskFilter, after: tuple[datetime, uuid.UUID] | None, param: Parameters
) -> str:
    """The WHERE clause of a listing: the filters, and the keyset position ``after``."""
    conditions: list[str] = []
    if filters.statuses:
        conditions.append(f"status = ANY({param([s.value for s in filters.statuses])}::text[])")
    if filters.type is not None:
        conditions.append(f"type = {param(filters.type)}")
    if filters.created_after is not None:
        conditions.append(f"created_at > {param(filters.created_after)}")
    if filters.created_before is not None:
        conditions.append(f"created_at < {param(filters.created_before)}")
    if after is not None:
        created_at, task_id = after
        conditions.append(f"(created_at, id) < ({param(created_at)}, {param(task_id)})")
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


async def list_tasks(
    conn: asyncpg.Connection | asyncpg.Pool,
    filters: TaskFilter,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> Page:
    """Task summaries (``SUMMARY_COLUMNS``), newest first, keyset-paginated on
    (created_at, id), which never changes for a row.

    ``after`` is the (created_at, id) of the last row of the previous page.
    """
    param = Parameters()
    where = _page_conditions(filters, after, param)
    query = (
        f"SELECT {SUMMARY_COLUMNS} FROM tasks {where} "  # noqa: S608 - fragments are constants
        f"ORDER BY created_at DESC, id DESC LIMIT {param(limit + 1)}"
    )
    rows = await conn.fetch(query, *param.values)
    return Page(rows=rows[:limit], has_more=len(rows) > limit)


async def list_full_tasks(
    conn: asyncpg.Connection | asyncpg.Pool,
    filters: TaskFilter,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    max_bytes: int,
) -> Page:
    """Whole tasks, in the order and with the keyset of ``list_tasks``, up to ``limit``
    of them and no more than ``max_bytes`` of payload, result and error (as JSON text)
    in all; the first task comes even when it alone is larger, so a walk always moves.

    One statement, so the sizes are those of the rows it returns: Postgres measures the
    page's candidates (``page``, sizes only), keeps the longest prefix within the budget
    (``kept``) and only then reads the whole rows, so a page past the budget never
    reaches this process. ``has_more`` is true when the page ended early, for the budget
    or the limit, with tasks left behind it.
    """
    param = Parameters()
    where = _page_conditions(filters, after, param)
    query = f"""
WITH page AS (
    SELECT id, created_at,
           octet_length(payload::text) + coalesce(octet_length(result::text), 0)
               + coalesce(octet_length(error::text), 0) AS bytes
    FROM tasks {where}
    ORDER BY created_at DESC, id DESC
    LIMIT {param(limit + 1)}
), running AS (
    SELECT id, row_number() OVER w AS position, sum(bytes) OVER w AS total
    FROM page
    WINDOW w AS (ORDER BY created_at DESC, id DESC)
), kept AS (
    SELECT id, position FROM running
    WHERE position <= {param(limit)} AND (position = 1 OR total <= {param(max_bytes)})
)
SELECT {TASK_COLUMNS}, (SELECT count(*) FROM page) > (SELECT count(*) FROM kept) AS has_more
FROM kept JOIN tasks USING (id)
ORDER BY kept.position
"""  # noqa: S608 - every fragment is a constant
    rows = await conn.fetch(query, *param.values)
    return Page(rows=rows, has_more=bool(rows) and rows[0]["has_more"])
