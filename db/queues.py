"""Queries of the named queues: what waits and runs in each, and which consumers serve it.

A queue exists once something uses it: a task routed to it or a consumer serving it
(``taskbox.runtime.queues``). Nothing here is on a hot path: the listing is an
operator's read (``GET /api/v1/queues``, ``taskbox status``), and the consumers' upsert
runs once per ``PRESENCE_INTERVAL`` per consumer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    SELECT queue FROM active UNION SELECT queue FROM seen UNION SELECT $2::text
)
SELECT n.queue AS name, coalesce(a.waiting, 0) AS waiting, coalesce(a.running, 0) AS running,
       a.oldest AS oldest_waiting_seconds, coalesce(s.consumers, 0) AS consumers,
       s.last_seen AS consumer_last_seen
FROM names AS n LEFT JOIN active AS a USING (queue) LEFT JOIN seen AS s USING (queue)
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
    paused: bool = False  # pausing a queue is not there yet; the field is


async def list_queues(conn: asyncpg.Connection | asyncpg.Pool) -> list[QueueView]:
    rows = await conn.fetch(_LIST, PRESENCE_WINDOW, DEFAULT_QUEUE)
    return [
        QueueView(
            row["name"],
            int(row["waiting"]),
            int(row["running"]),
            None
            if row["oldest_waiting_seconds"] is None
            else max(0.0, float(row["oldest_waiting_seconds"])),
            int(row["consumers"]),
        )
        for row in rows
    ]


async def consumers_seen(
    conn: asyncpg.Connection | asyncpg.Pool, served: Sequence[tuple[str, str]]
) -> None:
    """Record that each (queue, consumer) of ``served`` is being served now."""
    await conn.execute(_SEEN, [queue for queue, _ in served], [worker for _, worker in served])
