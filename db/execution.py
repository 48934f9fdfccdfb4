"""Queries of task execution: the consumer's claim, heartbeat, outcome and rescue.

Every transition is one conditional UPDATE. The fencing token is ``tasks.lease`` with
``tasks.worker_id``: each claim adds one to the lease and writes its consumer's id, and
a heartbeat and an outcome are written only while the task is still PROCESSING under
both, as its claim returned them. A consumer that lost its task (rescued, re-claimed,
or released by a write whose reply was lost and which it retries) can never match the
row again. The attempt count is not a fence: a graceful release gives its attempt back,
so an attempt number recurs.

A claim can still be lost after its consumer got the answer: a failover to an
asynchronous standby loses the primary's last commits (README, Guarantees). The row is
then back as it was, and the lease number the claim handed out can be handed out again,
to another consumer. The worker id is what keeps the two apart: the first consumer's
heartbeat and outcome, written under its own id, match nothing, so it stops (its
heartbeat finds the task gone) or its outcome is refused and its message goes back
through the claim, while the second runs the task: a duplicate run, never two owners.

The claim itself waits for its WAL flush (synchronous_commit on), although losing it
alone could only cause a duplicate: other consumers act on it before it is flushed. One
that receives a copy of the message sees the task PROCESSING under a live consumer and
acks the copy, writing nothing; had the first consumer died meanwhile (its message
back in the queue, then acked as that copy) and Postgres crashed before the flush, the
task would be back to PENDING with no message and no unpublished row: stranded.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

# A delivery claims its task when the task is PENDING. It also claims one that is
# PROCESSING with a stale heartbeat: its consumer died and the broker redelivered the
# message to us; unless that attempt was its last or a cancel is pending, which the
# rescue turns into FAILED or CANCELLED rather than running it once more.
# NEW is accepted too, and that is what closes the race with the relay: a message
# arrives as soon as the broker has it, before the relay has recorded the confirm and
# flipped NEW -> PENDING. The relay locks no task row until then (and its flip skips a
# row we hold), so the claim takes the NEW task at once; if the flip holds the row, the
# UPDATE waits for it and re-checks the committed row (PENDING): claimed either way.
# Had we asked for PENDING only, Postgres would skip the row without waiting and the
# message would be dropped. If the relay rolled back instead, the task is still NEW and
# we run it now; its re-publish later is a duplicate.
# But a NEW task is claimed only by the message of its newest outbox row: an older
# message (a redelivery of the attempt before a retry, a replay) would otherwise run a
# retry before its backoff is over. The newer row is unpublished or in flight, so the
# task keeps its way forward and the old message is superseded.
# Last, a task already PROCESSING under this very worker id: our previous claim
# committed but its reply was lost with the connection, so the retry takes it back
# without counting another attempt. (The consumer never claims a task it is running:
# it holds further deliveries of a running task until that attempt's outcome is
# written or refused.) Every claim takes a new lease, the lost reply's too.
# A NEW task's message must be its newest row's: a NOT EXISTS on the task's rows
# (ix_outbox_task_id), as in db.outbox, never a max(id) over the outbox's key.
# The outer SELECT reports, for every requested id, whether it exists at all, so the
# caller can dead-letter messages that name no task.
_CLAIM = """
WITH delivery AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[]) AS d(id, outbox_id)
), claimed AS (
    UPDATE tasks AS t
    SET status = 'PROCESSING',
        attempts = CASE WHEN t.status = 'PROCESSING' AND t.worker_id = $3
                        THEN t.attempts ELSE t.attempts + 1 END,
        lease = t.lease + 1,
        worker_id = $3,
        started_at = now(), heartbeat_at = now(), updated_at = now()
    FROM delivery AS d
    WHERE t.id = d.id AND NOT t.cancel_requested
      AND (t.status = 'PENDING'
           OR (t.status = 'NEW'
               AND NOT EXISTS (SELECT 1 FROM outbox AS o
                               WHERE o.task_id = t.id AND o.id > d.outbox_id))
           OR (t.status = 'PROCESSING' AND t.heartbeat_at < now() - make_interval(secs => $4)
               AND t.attempts < t.max_attempts)
           OR (t.status = 'PROCESSING' AND t.worker_id = $3))
    RETURNING t.id, t.type, t.payload, t.attempts, t.max_attempts, t.lease, t.created_at
)
SELECT d.id, c.type, c.payload, c.attempts, c.max_attempts, c.lease, c.created_at,
       c.id IS NOT NULL AS claimed, t.status AS seen_status
FROM delivery AS d
LEFT JOIN claimed AS c ON c.id = d.id
LEFT JOIN tasks AS t ON t.id = d.id
"""

# Outcomes of many tasks in one statement and one commit; a retry is a new outbox row
# with available_at in the future, so it survives any crash and needs no broker plugin.
# The retry row carries the attempt's trace context, so the next attempt logs the same
# trace id. A cancel accepted while the attempt ran (cancel_requested, read from the
# locked row) wins over a retry and over a release: the task ends CANCELLED rather
# than starting another attempt. A release (outcome PENDING: handed back unfinished at
# shutdown) gives its attempt back and goes out like a retry due at once: NEW with a new
# outbox row. It must not count on its own message going back to the queue: that
# delivery may be stale (its channel closed meanwhile, the broker redelivered it and
# another consumer dropped it while this one still owned the task), and a PENDING task
# with no message would wait for ever. The lease is what fences a release, so one
# retried after its reply was lost matches nothing.
_FINISH = """
WITH outcome AS (
    SELECT o.*,
           CASE WHEN o.status IN ('NEW', 'PENDING') THEN 'CANCELLED' ELSE o.status END
               AS if_cancelled
    FROM jsonb_to_recordset($1::jsonb)
        AS o(id uuid, lease bigint, status text, result jsonb, error jsonb, retry_in float8,
             traceparent text)
), updated AS (
    UPDATE tasks AS t
    SET status = CASE WHEN t.cancel_requested THEN o.if_cancelled
                      WHEN o.status = 'PENDING' THEN 'NEW'
                      ELSE o.status END,
        result = o.result,
        error = CASE WHEN t.cancel_requested AND o.if_cancelled <> o.status
                     THEN jsonb_build_object('type', 'Cancelled', 'message',
                          'cancelled on request while running; the attempt ended without '
                          || 'a result and no other attempt is started')
                     ELSE o.error END,
        finished_at = CASE WHEN t.cancel_requested OR o.status IN ('DONE', 'FAILED', 'CANCELLED')
                           THEN now() END,
        heartbeat_at = NULL,
        cancel_requested = false,
        attempts = CASE WHEN o.status = 'PENDING' AND NOT t.cancel_requested
                        THEN t.attempts - 1 ELSE t.attempts END,
        updated_at = now()
    FROM outcome AS o
    WHERE t.id = o.id AND t.status = 'PROCESSING' AND t.lease = o.lease AND t.worker_id = $2
    RETURNING t.id, t.type, t.priority, t.status, o.retry_in, o.traceparent
), retried AS (
    INSERT INTO outbox (task_id, kind, body, available_at, headers)
    SELECT id, 'task.retry',
           jsonb_build_object('task_id', id, 'type', type, 'priority', priority),
           now() + make_interval(secs => retry_in),
           jsonb_strip_nulls(jsonb_build_object('traceparent', traceparent))
    FROM updated WHERE status = 'NEW'
)
SELECT id, status FROM updated
"""

_HEARTBEAT = """
UPDATE tasks AS t SET heartbeat_at = now()
FROM unnest($1::uuid[], $2::bigint[]) AS h(id, lease)
WHERE t.id = h.id AND t.status = 'PROCESSING' AND t.lease = h.lease AND t.worker_id = $3
RETURNING t.id, t.cancel_requested
"""

# Tasks whose consumer vanished: CANCELLED if a cancel was pending, FAILED when that was
# their last attempt, else back through the outbox. SKIP LOCKED lets several consumers
# run the rescue at once without waiting on each other. The decision is taken in the
# UPDATE, from the row as locked: a cancel (or a heartbeat) committed after this
# statement's snapshot was taken is seen, where a separate read of the snapshot would
# miss it. A requeued task keeps the trace context of its latest outbox row (a rare
# path, one index lookup per rescued task).
# The trace context of task r's newest outbox row, for a row that sends it again.
_LATEST_TRACE = """coalesce((SELECT jsonb_strip_nulls(jsonb_build_object('traceparent',
                                                    o.headers -> 'traceparent'))
                     FROM outbox AS o WHERE o.task_id = r.id ORDER BY o.id DESC LIMIT 1),
                    '{}'::jsonb)"""

_RESCUE = f"""
WITH stale AS (
    SELECT id FROM tasks
    WHERE status = 'PROCESSING' AND heartbeat_at < now() - make_interval(secs => $1)
    ORDER BY heartbeat_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), rescued AS (
    UPDATE tasks AS t
    SET status = CASE WHEN t.cancel_requested THEN 'CANCELLED'
                      WHEN t.attempts >= t.max_attempts THEN 'FAILED'
                      ELSE 'NEW' END,
        error = CASE
            WHEN t.cancel_requested THEN jsonb_build_object('type', 'Cancelled',
                 'message', 'cancelled on request; its consumer stopped before finishing')
            WHEN t.attempts >= t.max_attempts THEN jsonb_build_object('type', 'WorkerLost',
                 'message', 'the consumer running this task stopped heartbeating')
            ELSE t.error END,
        finished_at = CASE WHEN t.cancel_requested OR t.attempts >= t.max_attempts
                           THEN now() END,
        cancel_requested = false,
        heartbeat_at = NULL,
        updated_at = now()
    FROM stale
    WHERE t.id = stale.id AND t.status = 'PROCESSING'
      AND t.heartbeat_at < now() - make_interval(secs => $1)
    RETURNING t.id, t.type, t.priority, t.status, t.attempts
), requeued AS (
    INSERT INTO outbox (task_id, kind, body, headers)
    SELECT r.id, 'task.retry',
           jsonb_build_object('task_id', r.id, 'type', r.type, 'priority', r.priority),
           {_LATEST_TRACE}
    FROM rescued AS r WHERE r.status = 'NEW'
)
SELECT id, type, status, attempts FROM rescued
"""  # noqa: S608 - a constant fragment, no input

# A task message the broker dead-lettered (a quorum queue's x-delivery-limit, or a TTL
# or length policy an operator set) was the task's only way forward when the task is
# PENDING and the message is for its newest outbox row: the task goes back to NEW with
# a new outbox row, as the rescue sends it. Anything else needs nothing: a finished
# task, one running (its owner or the rescue see to it), or one waiting on a newer row
# (unpublished, or its message in flight). The conditional UPDATE makes a second copy
# of the same dead letter (a redelivery of the watch's message) a no-op: the first one
# wrote a newer row.
_REQUEUE_DEAD_LETTERED = f"""
WITH requeued AS (
    UPDATE tasks AS t SET status = 'NEW', updated_at = now()
    WHERE t.id = $1 AND t.status = 'PENDING'
      AND NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.task_id = t.id AND o.id > $2)
    RETURNING t.id, t.type, t.priority
), queued AS (
    INSERT INTO outbox (task_id, kind, body, headers)
    SELECT r.id, 'task.retry',
           jsonb_build_object('task_id', r.id, 'type', r.type, 'priority', r.priority),
           {_LATEST_TRACE}
    FROM requeued AS r
    RETURNING id
)
SELECT (SELECT id FROM queued) AS outbox_id, (SELECT status FROM tasks WHERE id = $1) AS status
"""  # noqa: S608 - a constant fragment, no input


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended. ``status`` is DONE, FAILED, CANCELLED, NEW (retry in
    ``retry_in`` seconds) or PENDING (released unfinished at shutdown: written as NEW
    with a new outbox row, the attempt given back). ``lease`` is
    the fencing token its claim returned: the outcome is written only under it."""

    task_id: uuid.UUID
    attempt: int
    status: str
    result: Any = None
    error: dict[str, str] | None = None
    retry_in: float = 0.0
    traceparent: str | None = None  # carried onto the retry's outbox row
    lease: int = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message asking to run a task: the task and the outbox row it was sent for."""

    task_id: uuid.UUID
    outbox_id: int


async def claim_tasks(
    conn: asyncpg.Connection | asyncpg.Pool,
    deliveries: Sequence[Delivery],
    worker_id: str,
    stale_after: float,
) -> list[asyncpg.Record]:
    """Claim the deliveries' tasks (one row per delivery, ``claimed`` and ``lease`` for
    those taken, ``seen_status`` NULL for a task that does not exist)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _CLAIM,
        [d.task_id for d in deliveries],
        [d.outbox_id for d in deliveries],
        worker_id,
        stale_after,
    )
    return rows


def outcome_document(outcomes: Sequence[Outcome]) -> bytes:
    """The outcomes as the JSON ``finish_tasks`` sends; raises TypeError for a value the
    encoder refuses (a lone surrogate, say), before anything is sent."""
    return orjson.dumps(
        [
            {
                "id": str(o.task_id),
                "lease": o.lease,
                "status": o.status,
                "result": o.result,
                "error": o.error,
                "retry_in": o.retry_in,
                "traceparent": o.traceparent,
            }
            for o in outcomes
        ]
    )


async def finish_tasks(
    conn: asyncpg.Connection | asyncpg.Pool, outcomes: Sequence[Outcome], worker_id: str
) -> dict[uuid.UUID, str]:
    """Write the outcomes of ``worker_id``'s attempts; returns the status written for
    each task whose outcome was recorded (still owned under its lease and by that
    worker): NEW for a release, CANCELLED where a cancel overrode a retry or a release."""
    rows = await conn.fetch(_FINISH, orjson.Fragment(outcome_document(outcomes)), worker_id)
    return {row["id"]: row["status"] for row in rows}


async def heartbeat(
    conn: asyncpg.Connection | asyncpg.Pool,
    leases: Sequence[tuple[uuid.UUID, int]],
    worker_id: str,
) -> dict[uuid.UUID, bool]:
    """Refresh the heartbeat of tasks ``worker_id`` still holds under these leases; maps
    each still-owned id to cancel_requested. A running task missing from the answer is
    no longer ours."""
    rows = await conn.fetch(
        _HEARTBEAT, [task_id for task_id, _ in leases], [lease for _, lease in leases], worker_id
    )
    return {row["id"]: row["cancel_requested"] for row in rows}


async def rescue_stale(
    conn: asyncpg.Connection | asyncpg.Pool, stale_after: float, limit: int = 500
) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(_RESCUE, stale_after, limit)
    return rows


@dataclass(frozen=True, slots=True)
class DeadLetterDecision:
    """What a dead-lettered task message led to: ``outbox_id`` of the row that sends its
    task again, or None when the task needed nothing (``status`` as found, None for a
    task that does not exist)."""

    outbox_id: int | None
    status: str | None


async def requeue_dead_lettered(
    conn: asyncpg.Connection | asyncpg.Pool, delivery: Delivery
) -> DeadLetterDecision:
    row = await conn.fetchrow(_REQUEUE_DEAD_LETTERED, delivery.task_id, delivery.outbox_id)
    assert row is not None  # the outer SELECT always answers one row
    return DeadLetterDecision(row["outbox_id"], row["status"])
