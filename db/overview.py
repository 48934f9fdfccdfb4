"""Read-only figures for operators: task counts, the outbox backlog and its lag.

The relay refreshes its backlog gauges from here on a timer and ``python -m relay
status`` prints them; nothing on a hot path calls these.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

# Lag counts from when a row fell due (available_at: its creation, or the end of a
# retry's backoff), so a retry waiting out its backoff is not mistaken for a stuck relay.
# Parked rows (a paused queue's) are counted apart: they wait for a resume, not for the
# relay, and must not read as a relay falling behind.
_BACKLOG = """
SELECT count(*) AS rows,
       count(*) FILTER (WHERE available_at <= now()) AS due,
       count(*) FILTER (WHERE last_error IS NOT NULL) AS failing,
       coalesce(extract(epoch FROM
           now() - min(available_at) FILTER (WHERE available_at <= now())), 0) AS lag,
       (SELECT count(*) FROM outbox
        WHERE published_at IS NULL AND parked_queue IS NOT NULL) AS parked
FROM outbox WHERE published_at IS NULL AND parked_queue IS NULL
"""

_TASK_COUNTS = "SELECT status, count(*) AS n FROM tasks GROUP BY status"

_OLDEST_PENDING = """
SELECT extract(epoch FROM now() - min(updated_at)) FROM tasks WHERE status = 'PENDING'
"""

_OUTBOX_SIZE = """
SELECT greatest(c.reltuples, 0)::bigint AS estimated_rows,
       pg_total_relation_size(c.oid) AS bytes
FROM pg_class AS c WHERE c.oid = 'outbox'::regclass
"""

_LAST_PUBLISH_ERROR = """
SELECT last_error FROM outbox
WHERE published_at IS NULL AND last_error IS NOT NULL ORDER BY id DESC LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class Backlog:
    rows: int  # unpublished rows, including retries still waiting out their backoff
    due: int  # unpublished rows the relay should publish now
    failing: int  # unpublished rows whose last publish the broker refused
    lag: float  # seconds the oldest due row has waited (0 when none is due)
    parked: int = 0  # rows of paused queues, waiting for a resume (not in the above)


@dataclass(frozen=True, slots=True)
class TableSize:
    estimated_rows: int  # the planner's estimate: cheap, refreshed by (auto)vacuum/analyze
    bytes: int  # table, indexes and TOAST


async def backlog(conn: asyncpg.Connection | asyncpg.Pool) -> Backlog:
    row = await conn.fetchrow(_BACKLOG)
    assert row is not None
    return Backlog(
        int(row["rows"]),
        int(row["due"]),
        int(row["failing"]),
        float(row["lag"]),
        int(row["parked"]),
    )


async def task_counts(conn: asyncpg.Connection | asyncpg.Pool) -> dict[str, int]:
    """Tasks per status (counts every task row: an operator's query, not a hot one)."""
    return {row["status"]: int(row["n"]) for row in await conn.fetch(_TASK_COUNTS)}


async def oldest_pending_age(conn: asyncpg.Connection | asyncpg.Pool) -> float | None:
    """Seconds the longest-waiting PENDING task has been waiting; None when none waits."""
    age = await conn.fetchval(_OLDEST_PENDING)
    return None if age is None else float(age)


async def outbox_size(conn: asyncpg.Connection | asyncpg.Pool) -> TableSize:
    row = await conn.fetchrow(_OUTBOX_SIZE)
    assert row is not None
    rows = int(row["estimated_rows"])
    if rows == 0:
        # Never analyzed yet (a young table, so a small one): count it.
        rows = int(await conn.fetchval("SELECT count(*) FROM outbox"))
    return TableSize(rows, int(row["bytes"]))


async def last_publish_error(conn: asyncpg.Connection | asyncpg.Pool) -> str | None:
    error: str | None = await conn.fetchval(_LAST_PUBLISH_ERROR)
    return error
