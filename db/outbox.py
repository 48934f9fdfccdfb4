"""Queries of the outbox: the relay's claim, the publish bookkeeping and the wake-up."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from taskbox.db.states import TERMINAL

# The queues that have parked rows: one index probe per such queue (a skip scan of
# ix_outbox_parked written out, as Postgres 15 has none), whatever their number of rows;
# nothing at all when no row is parked. A recursive CTE: the statement using it starts
# WITH RECURSIVE.
_PARKED_QUEUES = """parked_queues(queue) AS (
    (SELECT parked_queue FROM outbox
     WHERE published_at IS NULL AND parked_queue IS NOT NULL
     ORDER BY parked_queue LIMIT 1)
    UNION ALL
    SELECT (SELECT o.parked_queue FROM outbox AS o
            WHERE o.published_at IS NULL AND o.parked_queue IS NOT NULL
              AND o.parked_queue > p.queue
            ORDER BY o.parked_queue LIMIT 1)
    FROM parked_queues AS p WHERE p.queue IS NOT NULL
)"""

# Claim a batch: lock the due rows (FOR UPDATE SKIP LOCKED), nothing else. The tasks
# go NEW -> PENDING only once the broker confirmed their messages, in the statement
# that records the outcome (below): until then no task row is locked, so a consumer
# that receives a message before the relay commits claims its task at once (the claim
# accepts NEW, see db.execution) instead of waiting out the relay's publish. If the
# relay dies before committing, the claim rolls back and the row is published again
# later: a duplicate, never a loss.
#
# The relay's transaction commits without waiting for its WAL flush
# (synchronous_commit off, set in the claim so it costs no round trip): losing it in a
# Postgres crash loses a mark-published or a refusal's backoff, so the row goes out
# again, a duplicate the consumers drop; it never loses a task or an outcome, and every
# later durable commit (the consumer's outcome) flushes it anyway.
#
# A due row whose task has already finished (cancelled before it was published, or a
# duplicate a rescue left for a task that ran again) is closed without being sent: its
# message could only be dropped by the consumer. That is how a cancel keeps a scheduled
# task's message from ever going out, without the api touching the outbox.
#
# Each row carries its task's queue, read from the task row the claim joins anyway: the
# relay publishes it there (no column on the outbox, no extra read per row).
#
# A due row of a paused queue is parked instead (parked_queue set, out of
# ix_outbox_due) and its task stays NEW; after the resume a relay unparks it (below).
# With no queue paused, the check reads an empty table. The claim also answers which
# queues have parked rows and are not paused (any more): the relay unparks them after
# the batch. Asked here rather than in a statement of its own before each drain, it
# costs no round trip (at a low rate, one drain a task, that was one statement in nine).
# Only a drain's first claim asks ($3): the scan walks dead index entries after a large
# resumed backlog went out, until vacuum, and a backlog's concurrent claims need not.
#
# Rows go oldest due first (ix_outbox_due). The statement also reports when the next
# row not yet due falls due, from the same now() as the claim's cutoff, so that a row
# falling due in between cannot slip through: the relay sleeps until then rather than
# until its poll. The one-row ``next`` LEFT JOINed to the batch means an empty claim
# still answers with that moment (and NULL row columns).
_CLAIM_BATCH = f"""
WITH RECURSIVE {_PARKED_QUEUES}, paused AS (
    SELECT queue FROM queue_pauses
), batch AS (
    SELECT o.id, o.task_id, o.kind, o.body, o.headers, o.publish_attempts, o.available_at,
           t.queue, t.status AS task_status, t.status = ANY($2::text[]) AS settled,
           t.queue IN (SELECT queue FROM paused) AS paused
    FROM outbox AS o JOIN tasks AS t ON t.id = o.task_id
    WHERE o.published_at IS NULL AND o.parked_queue IS NULL AND o.available_at <= now()
    ORDER BY o.available_at, o.id
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
), unsent AS (
    UPDATE outbox AS o SET published_at = now(), last_error = 'not sent: task ' || b.task_status
    FROM batch AS b WHERE o.id = b.id AND b.settled
), parked AS (
    UPDATE outbox AS o SET parked_queue = b.queue
    FROM batch AS b WHERE o.id = b.id AND b.paused AND NOT b.settled
), next AS (
    SELECT extract(epoch FROM min(available_at) - now())::float8 AS next_due_in,
           CASE WHEN $3 THEN
               (SELECT array_agg(queue) FROM parked_queues
                WHERE queue IS NOT NULL AND queue NOT IN (SELECT queue FROM paused))
           END AS resumed
    FROM outbox WHERE published_at IS NULL AND parked_queue IS NULL AND available_at > now()
), no_flush_wait AS (
    SELECT set_config('synchronous_commit', 'off', true)
)
SELECT b.id, b.task_id, b.kind, b.body, b.headers, b.publish_attempts, b.queue, b.settled,
       b.paused, next.next_due_in, next.resumed
FROM no_flush_wait, next LEFT JOIN batch AS b ON true
ORDER BY b.available_at, b.id
"""  # noqa: S608 - a constant fragment, no input

# Confirmed rows are marked published and their tasks go NEW -> PENDING, but only a
# task still NEW whose newest outbox row is the one just published: a consumer may have
# claimed the task from this very message meanwhile (PROCESSING), finished it, or sent
# it back to NEW with a newer row (a retry in its backoff, a release), and none of that
# is undone. The flip skips a task row another transaction holds (SKIP LOCKED): that is
# a consumer claiming or finishing it, or a cancel, each taking it past NEW; waiting
# instead would hold this batch's locks while the other waits for them (a consumer's
# claim or outcome batch locks several tasks in an order of its own): a deadlock.
# "Newest" is a NOT EXISTS on the task's rows (ix_outbox_task_id), not a max(id): the
# planner turns max() into a backward walk of the whole outbox's primary key, filtered
# by task, which took seconds a batch behind a large backlog (bench/BASELINE.md).
# Refused rows keep published_at NULL, record why and wait out a backoff, so they never
# block the rows behind them; their tasks stay NEW, since nothing of theirs reached the
# queue.
_RECORD_PUBLISH_OUTCOME = """
WITH published AS (
    UPDATE outbox
    SET published_at = now(), publish_attempts = publish_attempts + 1, last_error = NULL
    WHERE id = ANY($1::bigint[])
    RETURNING id, task_id
), refused AS (
    UPDATE outbox AS o
    SET publish_attempts = o.publish_attempts + 1,
        last_error = f.error,
        available_at = now() + make_interval(secs => f.delay)
    FROM unnest($2::bigint[], $3::text[], $4::float8[]) AS f(id, error, delay)
    WHERE o.id = f.id
), flippable AS (
    SELECT t.id FROM tasks AS t JOIN published AS p ON p.task_id = t.id
    WHERE t.status = 'NEW'
      AND NOT EXISTS (SELECT 1 FROM outbox AS o WHERE o.task_id = t.id AND o.id > p.id)
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE tasks SET status = 'PENDING', updated_at = now()
WHERE id IN (SELECT id FROM flippable) AND status = 'NEW'
"""

# The queues that have parked rows and are not paused (any more), as the claim reports
# them too. Each drain's first claim answers it and the relay unparks what it finds.
# That is also what makes a resume safe without any lock between it and the claims: a
# claim that saw the pause just before the resume committed may park rows after the
# resume; they show up at the next drain's claim and go out then.
_RESUMED_QUEUES = f"""
WITH RECURSIVE {_PARKED_QUEUES}
SELECT queue FROM parked_queues
WHERE queue IS NOT NULL AND queue NOT IN (SELECT queue FROM queue_pauses)
"""  # noqa: S608 - a constant fragment, no input

# One chunk of a resumed queue's parked rows, oldest due first, back into the claim's
# index: a short transaction however large the backlog (the claims go on between the
# chunks). Rows another relay is unparking are skipped (SKIP LOCKED). The pause check
# reads this statement's snapshot: a pause committed meanwhile is missed for this chunk,
# and the claim parks those rows again.
_UNPARK = """
UPDATE outbox SET parked_queue = NULL
WHERE id IN (
    SELECT id FROM outbox
    WHERE published_at IS NULL AND parked_queue = $1
    ORDER BY available_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
) AND NOT EXISTS (SELECT 1 FROM queue_pauses WHERE queue = $1)
"""

_NOTIFY = "SELECT pg_notify($1, $2)"


@dataclass(frozen=True, slots=True)
class PublishRefusal:
    outbox_id: int
    error: str
    retry_in: float  # seconds


@dataclass(frozen=True, slots=True)
class Claim:
    rows: list[asyncpg.Record]  # to publish
    # rows claimed, those closed unsent (their task had finished) and those parked
    # (their queue is paused) included
    claimed: int
    parked: int
    # Seconds from the claim until the next unpublished row falls due; None when every
    # unpublished row is due already or there is none.
    next_due_in: float | None
    # Queues with parked rows that are not paused (any more): to unpark.
    resumed: list[str]


_SETTLED = sorted(TERMINAL)


async def claim_batch(conn: asyncpg.Connection, limit: int, *, resumed: bool = True) -> Claim:
    """Lock up to ``limit`` due, unpublished rows; call inside a transaction. With
    ``resumed`` false, ``Claim.resumed`` is not looked up (empty)."""
    found: list[asyncpg.Record] = await conn.fetch(_CLAIM_BATCH, limit, _SETTLED, resumed)
    claimed = [row for row in found if row["id"] is not None]
    rows = [row for row in claimed if not row["settled"] and not row["paused"]]
    parked = sum(1 for row in claimed if row["paused"] and not row["settled"])
    return Claim(rows, len(claimed), parked, found[0]["next_due_in"], found[0]["resumed"] or [])


async def record_publish_outcome(
    conn: asyncpg.Connection,
    published: Sequence[int],
    refused: Sequence[PublishRefusal],
) -> None:
    await conn.execute(
        _RECORD_PUBLISH_OUTCOME,
        list(published),
        [r.outbox_id for r in refused],
        [r.error[:1000] for r in refused],
        [r.retry_in for r in refused],
    )


async def notify(conn: asyncpg.Connection | asyncpg.Pool, channel: str, payload: str = "") -> None:
    await conn.execute(_NOTIFY, channel, payload)


async def resumed_queues(conn: asyncpg.Connection | asyncpg.Pool) -> list[str]:
    """The queues with parked rows that are not paused: their rows await an unpark."""
    return [row["queue"] for row in await conn.fetch(_RESUMED_QUEUES)]


async def unpark(conn: asyncpg.Connection | asyncpg.Pool, queue: str, limit: int) -> int:
    """Unpark up to ``limit`` of ``queue``'s parked rows, oldest due first; how many."""
    status = await conn.execute(_UNPARK, queue, limit)
    return int(status.split()[-1])
