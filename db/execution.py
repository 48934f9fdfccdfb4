"""Queries of task execution: the consumer's claim, heartbeat, outcome and rescue.

Every transition is one conditional UPDATE. The attempt number taken at claim time is
the fencing token: an outcome is written only while the task is still PROCESSING at
that same attempt, so a consumer that lost its task (rescued, re-claimed) can never
overwrite the newer owner's result.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

# A message whose task is PENDING is claimed. So is one whose task is PROCESSING with a
# stale heartbeat: its consumer died and the broker redelivered the message to us;
# unless that attempt was its last or it was cancelled meanwhile, which the rescue
# turns into FAILED or CANCELLED rather than running it once more.
# NEW is accepted too, and that is what closes the race with the relay: a message can
# arrive before the relay has committed NEW -> PENDING. In our snapshot the row is
# still NEW, so it matches, the UPDATE waits for the relay's row lock and re-checks the
# committed row (PENDING): claimed. Had we asked for PENDING only, Postgres would skip
# the row without waiting and the message would be dropped. If the relay rolled back
# instead, the task is still NEW and we run it now; its re-publish later is a duplicate.
# Last, a task already PROCESSING under this very worker id: our previous claim
# committed but its reply was lost with the connection, so the retry takes it back
# without counting another attempt. (A task the worker really runs never reaches the
# claim: its further deliveries are settled as duplicates before.)
# The outer SELECT reports, for every requested id, whether it exists at all, so the
# caller can dead-letter messages that name no task.
_CLAIM = """
WITH claimed AS (
    UPDATE tasks
    SET status = 'PROCESSING',
        attempts = CASE WHEN status = 'PROCESSING' AND worker_id = $2
                        THEN attempts ELSE attempts + 1 END,
        worker_id = $2,
        started_at = now(), heartbeat_at = now(), updated_at = now()
    WHERE id = ANY($1::uuid[])
      AND (status IN ('NEW', 'PENDING')
           OR (status = 'PROCESSING' AND heartbeat_at < now() - make_interval(secs => $3)
               AND attempts < max_attempts AND NOT cancel_requested)
           OR (status = 'PROCESSING' AND worker_id = $2 AND NOT cancel_requested))
    RETURNING id, type, payload, attempts, max_attempts, created_at
)
SELECT r.id, c.type, c.payload, c.attempts, c.max_attempts, c.created_at,
       c.id IS NOT NULL AS claimed, t.status AS seen_status
FROM unnest($1::uuid[]) AS r(id)
LEFT JOIN claimed AS c ON c.id = r.id
LEFT JOIN tasks AS t ON t.id = r.id
"""

# Outcomes of many tasks in one statement and one commit; a retry is a new outbox row
# with available_at in the future, so it survives any crash and needs no broker plugin.
# The retry row carries the attempt's trace context, so the next attempt logs the same
# trace id.
_FINISH = """
WITH outcome AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb)
        AS o(id uuid, attempt int, status text, result jsonb, error jsonb, retry_in float8,
             traceparent text)
), updated AS (
    UPDATE tasks AS t
    SET status = o.status,
        result = o.result,
        error = o.error,
        finished_at = CASE WHEN o.status IN ('DONE', 'FAILED', 'CANCELLED') THEN now() END,
        heartbeat_at = NULL,
        cancel_requested = false,
        attempts = CASE WHEN o.status = 'PENDING' THEN t.attempts - 1 ELSE t.attempts END,
        updated_at = now()
    FROM outcome AS o
    WHERE t.id = o.id AND t.status = 'PROCESSING' AND t.attempts = o.attempt
    RETURNING t.id, t.type, t.priority, o.status, o.retry_in, o.traceparent
), retried AS (
    INSERT INTO outbox (task_id, kind, body, available_at, headers)
    SELECT id, 'task.retry',
           jsonb_build_object('task_id', id, 'type', type, 'priority', priority),
           now() + make_interval(secs => retry_in),
           jsonb_strip_nulls(jsonb_build_object('traceparent', traceparent))
    FROM updated WHERE status = 'NEW'
)
SELECT id FROM updated
"""

_HEARTBEAT = """
UPDATE tasks SET heartbeat_at = now()
WHERE id = ANY($1::uuid[]) AND status = 'PROCESSING' AND worker_id = $2
RETURNING id, cancel_requested
"""

# Tasks whose consumer vanished: CANCELLED if a cancel was pending, FAILED when that was
# their last attempt, else back through the outbox. SKIP LOCKED lets several consumers
# run the rescue at once without waiting on each other. A requeued task keeps the trace
# context of its latest outbox row (a rare path, one index lookup per rescued task).
_RESCUE = """
WITH stale AS (
    SELECT id FROM tasks
    WHERE status = 'PROCESSING' AND heartbeat_at < now() - make_interval(secs => $1)
    ORDER BY heartbeat_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), decided AS (
    SELECT t.id,
           CASE WHEN t.cancel_requested THEN 'CANCELLED'
                WHEN t.attempts >= t.max_attempts THEN 'FAILED'
                ELSE 'NEW' END AS status
    FROM tasks AS t JOIN stale ON stale.id = t.id
), rescued AS (
    UPDATE tasks AS t
    SET status = d.status,
        error = CASE d.status
            WHEN 'CANCELLED' THEN jsonb_build_object('type', 'Cancelled',
                 'message', 'cancelled on request; its consumer stopped before finishing')
            WHEN 'FAILED' THEN jsonb_build_object('type', 'WorkerLost',
                 'message', 'the consumer running this task stopped heartbeating')
            ELSE t.error END,
        finished_at = CASE WHEN d.status = 'NEW' THEN NULL ELSE now() END,
        cancel_requested = false,
        heartbeat_at = NULL,
        updated_at = now()
    FROM decided AS d WHERE t.id = d.id
    RETURNING t.id, t.type, t.priority, t.status, t.attempts
), requeued AS (
    INSERT INTO outbox (task_id, kind, body, headers)
    SELECT r.id, 'task.retry',
           jsonb_build_object('task_id', r.id, 'type', r.type, 'priority', r.priority),
           coalesce((SELECT jsonb_strip_nulls(jsonb_build_object('traceparent',
                                                                 o.headers -> 'traceparent'))
                     FROM outbox AS o WHERE o.task_id = r.id ORDER BY o.id DESC LIMIT 1),
                    '{}'::jsonb)
    FROM rescued AS r WHERE r.status = 'NEW'
)
SELECT id, type, status, attempts FROM rescued
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended. ``status`` is DONE, FAILED, CANCELLED, NEW (retry in
    ``retry_in`` seconds) or PENDING (released unfinished at shutdown)."""

    task_id: uuid.UUID
    attempt: int
    status: str
    result: Any = None
    error: dict[str, str] | None = None
    retry_in: float = 0.0
    traceparent: str | None = None  # carried onto the retry's outbox row


async def claim_tasks(
    conn: asyncpg.Connection | asyncpg.Pool,
    task_ids: Sequence[uuid.UUID],
    worker_id: str,
    stale_after: float,
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(_CLAIM, list(task_ids), worker_id, stale_after)
    return rows


async def finish_tasks(
    conn: asyncpg.Connection | asyncpg.Pool, outcomes: Sequence[Outcome]
) -> set[uuid.UUID]:
    """Write the outcomes; returns the ids whose outcome was recorded (still owned)."""
    document = orjson.dumps(
        [
            {
                "id": str(o.task_id),
                "attempt": o.attempt,
                "status": o.status,
                "result": o.result,
                "error": o.error,
                "retry_in": o.retry_in,
                "traceparent": o.traceparent,
            }
            for o in outcomes
        ]
    )
    rows = await conn.fetch(_FINISH, orjson.Fragment(document))
    return {row["id"] for row in rows}


async def heartbeat(
    conn: asyncpg.Connection | asyncpg.Pool, task_ids: Sequence[uuid.UUID], worker_id: str
) -> dict[uuid.UUID, bool]:
    """Refresh the running tasks' heartbeat; maps each still-owned id to cancel_requested."""
    rows = await conn.fetch(_HEARTBEAT, list(task_ids), worker_id)
    return {row["id"]: row["cancel_requested"] for row in rows}


async def rescue_stale(
    conn: asyncpg.Connection | asyncpg.Pool, stale_after: float, limit: int = 500
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(_RESCUE, stale_after, limit)
    return rows
