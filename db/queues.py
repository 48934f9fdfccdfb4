"""Queries of the named queues: what waits and runs in each, and which consumers serve it.

A queue exists once something uses it: a task routed to it or a consumer serving it
(``taskbox.runtime.queues``). Nothing here is on a hot path: the listing is an
operator's read (``GET /api/v1/queues``, ``taskbox status``), and the consumers' upsert
runs once per ``PRESENCE_INTERVAL`` per consumer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from taskbox.runtime.queues import DEFAULT_QUEUE, PRESENCE_WINDOW

# Only unfinished tasks are read, through the (status, created_at, id) index, so the
# listing costs what waits and runs, not the table's history. A queue is listed while
# it has unfinished tasks, or a consumer served it within the last day (PRESENCE_KEPT:
# the relay's housekeeping deletes older rows), and ``default`` always. The oldest
# waiting age counts, for each task that may run now (a scheduled one from its run_at),
# from its last change of state: a PENDING task from its publish, a NEW one from its
# creation or its retry.
_LIST = """
WITH active AS (
    SELECT queue,
           count(*) FILTER (WHERE status IN ('NEW', 'PENDING')) AS waiting,
           count(*) FILTER (WHERE status = 'PROCESSING') AS running,
           extract(epoch FROM now() - min(greatest(updated_at, run_at))
                   FILTER (WHERE status IN ('NEW', 'PENDING')
                           AND (run_at IS NULL OR run_at <= now())))::float8 AS oldest
    FROM tasks WHERE status IN ('NEW', 'PENDING', 'PROCESSING')
    GROUP BY queue
), seen AS (
    SELECT queue,
           count(*) FILTER (WHERE seen_at > now() - make_interval(secs => $1)) AS consumers,
           max(seen_at) AS last_seen
    FROM queue_consumers GROUP BY queue
), names AS (
    SELECT queue FROM active UNION SELECT queue FROM seen
    UNION SELECT queue FROM queue_pauses UNION SELECT $2::text
)
SELECT n.queue AS name, coalesce(a.waiting, 0) AS waiting, coalesce(a.running, 0) AS running,
       a.oldest AS oldest_waiting_seconds, coalesce(s.consumers, 0) AS consumers,
       s.last_seen AS consumer_last_seen,
       p.queue IS NOT NULL AS paused, p.paused_at, p.paused_by, p.reason AS pause_reason
FROM names AS n LEFT JOIN active AS a USING (queue) LEFT JOIN seen AS s USING (queue)
     LEFT JOIN queue_pauses AS p USING (queue)
WHERE $3::text IS NULL OR n.queue = $3
ORDER BY n.queue
"""

_SEEN = """
INSERT INTO queue_consumers (queue, consumer, seen_at)
SELECT queue, consumer, now() FROM unnest($1::text[], $2::text[]) AS s(queue, consumer)
ON CONFLICT (queue, consumer) DO UPDATE SET seen_at = excluded.seen_at
"""


@dataclass(frozen=True, slots=True)
class QueueView:
    name: str
    waiting: int  # NEW and PENDING tasks
    running: int  # PROCESSING tasks
    oldest_waiting_seconds: float | None  # None: nothing waits that may run now
    consumers: int  # consumers seen serving it within PRESENCE_WINDOW
    paused: bool = False
    paused_at: datetime | None = None
    paused_by: str | None = None
    pause_reason: str | None = None


def _view(row: asyncpg.Record) -> QueueView:
    oldest = row["oldest_waiting_seconds"]
    return QueueView(
        row["name"],
        int(row["waiting"]),
        int(row["running"]),
        None if oldest is None else max(0.0, float(oldest)),
        int(row["consumers"]),
        bool(row["paused"]),
        row["paused_at"],
        row["paused_by"],
        row["pause_reason"],
    )


async def list_queues(conn: asyncpg.Connection | asyncpg.Pool) -> list[QueueView]:
    rows = await conn.fetch(_LIST, PRESENCE_WINDOW, DEFAULT_QUEUE, None)
    return [_view(row) for row in rows]


async def get_queue(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> QueueView | None:
    """The queue ``name`` as the listing shows it; None when it is not in use."""
    row = await conn.fetchrow(_LIST, PRESENCE_WINDOW, DEFAULT_QUEUE, name)
    return None if row is None else _view(row)


async def consumers_seen(
    conn: asyncpg.Connection | asyncpg.Pool, served: Sequence[tuple[str, str]]
) -> None:
    """Record that each (queue, consumer) of ``served`` is being served now."""
    await conn.execute(_SEEN, [queue for queue, _ in served], [worker for _, worker in served])


# -- pausing ---------------------------------------------------------------------------

# Both run as the tables' owner (migration 0006): the api changes nothing else of the
# queues and has no privilege on the outbox, whose parked rows a resume counts.
_PAUSE = "SELECT pause_queue($1, $2, $3)"
_RESUME = "SELECT resume_queue($1, $2, $3, $4)"

_EVENTS = """
SELECT id, queue, action, at, actor, reason FROM queue_events
WHERE queue = $1 ORDER BY id DESC LIMIT $2
"""

_PAUSED = "SELECT queue FROM queue_pauses"


@dataclass(frozen=True, slots=True)
class QueueEvent:
    id: int
    queue: str
    action: str  # pause | resume
    at: datetime
    actor: str
    reason: str


async def pause(
    conn: asyncpg.Connection | asyncpg.Pool, queue: str, actor: str, reason: str
) -> bool:
    """Pause ``queue``: the relays park its due rows from their next claim on and the
    consumers stop taking its messages. False when it was paused already (then nothing
    changes and nothing is recorded)."""
    return bool(await conn.fetchval(_PAUSE, queue, actor, reason))


async def resume(
    conn: asyncpg.Connection | asyncpg.Pool, queue: str, actor: str, reason: str, channel: str
) -> int | None:
    """Resume ``queue`` and wake the relays on ``channel``: how many parked outbox rows
    the relays now send (they unpark them, a chunk at a time: db.outbox), or None when
    the queue was not paused. Constant time, whatever the backlog."""
    unparked = await conn.fetchval(_RESUME, queue, actor, reason, channel)
    return None if unparked is None else int(unparked)


async def describe(
    conn: asyncpg.Connection | asyncpg.Pool, queue: str, *, known: bool = False
) -> tuple[QueueView | None, list[QueueEvent]]:
    """The queue as listed and its latest events. A queue not in use but paused or
    resumed before (or ``known``: just paused or resumed) is shown empty; None for a
    name never used at all."""
    view = await get_queue(conn, queue)
    history = await events(conn, queue)
    if view is None and (known or history):
        view = QueueView(queue, 0, 0, None, 0)
    return view, history


async def events(
    conn: asyncpg.Connection | asyncpg.Pool, queue: str, limit: int = 20
) -> list[QueueEvent]:
    """The newest ``limit`` pauses and resumes of ``queue``, newest first."""
    return [QueueEvent(**dict(row)) for row in await conn.fetch(_EVENTS, queue, limit)]


async def paused_queues(conn: asyncpg.Connection | asyncpg.Pool) -> set[str]:
    return {row["queue"] for row in await conn.fetch(_PAUSED)}
