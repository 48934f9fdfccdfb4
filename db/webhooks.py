"""Queries of webhooks: subscriptions (the api), the webhook outbox's claim and
bookkeeping (the relay's delivery worker), deliveries and attempts as the API shows
them, and replays.

Deliveries are never inserted here: the trigger of migration 0009 writes them in the
transaction that ends a task. Each function takes the caller's connection.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from taskbox.webhooks.events import WEBHOOK_CHANNEL

DeliveryStatus = Literal["pending", "delivered", "failed"]
DELIVERY_STATUSES: tuple[DeliveryStatus, ...] = ("pending", "delivered", "failed")

# Everything but the secrets, which leave the database only to sign (claim_due) and,
# once, in the answer to a create or a rotation.
WEBHOOK_COLUMNS = (
    "id, url, events, task_types, queues, enabled, created_at, updated_at, "
    "previous_secret_expires_at"
)
DELIVERY_COLUMNS = (
    "id, webhook_id, url, task_id, event, status, attempts, next_attempt_at, created_at, "
    "delivered_at"
)
ATTEMPT_COLUMNS = "attempt, at, status_code, latency_ms, error, response_body"


@dataclass(frozen=True, slots=True)
class Subscription:
    url: str
    events: Sequence[str]
    task_types: Sequence[str] | None = None
    queues: Sequence[str] | None = None
    enabled: bool = True


async def create_webhook(
    conn: asyncpg.Connection | asyncpg.Pool, subscription: Subscription, secret: str
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"""INSERT INTO webhooks (url, events, task_types, queues, enabled, secret)
        VALUES ($1, $2, $3, $4, $5, $6) RETURNING {WEBHOOK_COLUMNS}""",  # noqa: S608
        subscription.url,
        list(subscription.events),
        _optional(subscription.task_types),
        _optional(subscription.queues),
        subscription.enabled,
        secret,
    )
    assert row is not None
    return row


def _optional(values: Sequence[str] | None) -> list[str] | None:
    return None if values is None else list(values)


async def list_webhooks(conn: asyncpg.Connection | asyncpg.Pool) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_at, id"  # noqa: S608
    )
    return rows


async def get_webhook(
    conn: asyncpg.Connection | asyncpg.Pool, webhook_id: uuid.UUID
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1",  # noqa: S608
        webhook_id,
    )


# The fields a PATCH may change; each is set only when given ($n::bool flags say which,
# since NULL is a value of task_types and queues: every type, every queue).
_UPDATE = f"""
UPDATE webhooks SET
    url = CASE WHEN $2 THEN $3 ELSE url END,
    events = CASE WHEN $4 THEN $5 ELSE events END,
    task_types = CASE WHEN $6 THEN $7 ELSE task_types END,
    queues = CASE WHEN $8 THEN $9 ELSE queues END,
    enabled = CASE WHEN $10 THEN $11 ELSE enabled END,
    updated_at = now()
WHERE id = $1
RETURNING {WEBHOOK_COLUMNS}
"""  # noqa: S608 - a constant


async def update_webhook(
    conn: asyncpg.Connection | asyncpg.Pool, webhook_id: uuid.UUID, changes: dict[str, Any]
) -> asyncpg.Record | None:
    """Set the fields in ``changes`` (url, events, task_types, queues, enabled)."""
    values: list[Any] = [webhook_id]
    for field in ("url", "events", "task_types", "queues", "enabled"):
        values += [field in changes, changes.get(field)]
    return await conn.fetchrow(_UPDATE, *values)


async def delete_webhook(conn: asyncpg.Connection | asyncpg.Pool, webhook_id: uuid.UUID) -> bool:
    """Delete the subscription with its deliveries and their attempts (cascade)."""
    deleted = await conn.fetchval("DELETE FROM webhooks WHERE id = $1 RETURNING id", webhook_id)
    return deleted is not None


async def rotate_secret(
    conn: asyncpg.Connection | asyncpg.Pool, webhook_id: uuid.UUID, secret: str, grace: float
) -> asyncpg.Record | None:
    """``secret`` signs from now on; the current one keeps signing too for ``grace``
    seconds, so receivers can switch over without rejecting a delivery."""
    return await conn.fetchrow(
        f"""UPDATE webhooks SET previous_secret = secret,
            previous_secret_expires_at = now() + make_interval(secs => $3::float8),
            secret = $2, updated_at = now()
        WHERE id = $1 RETURNING {WEBHOOK_COLUMNS}""",  # noqa: S608
        webhook_id,
        secret,
        grace,
    )


async def list_deliveries(
    conn: asyncpg.Connection | asyncpg.Pool,
    webhook_id: uuid.UUID,
    status: DeliveryStatus | None,
    limit: int,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[asyncpg.Record]:
    """A subscription's deliveries, newest first, after the keyset position ``before``."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries
        WHERE webhook_id = $1 AND ($2::text IS NULL OR status = $2)
          AND ($4::timestamptz IS NULL OR (created_at, id) < ($4, $5::uuid))
        ORDER BY created_at DESC, id DESC LIMIT $3""",  # noqa: S608
        webhook_id,
        status,
        limit,
        before[0] if before else None,
        before[1] if before else None,
    )
    return rows


async def task_deliveries(
    conn: asyncpg.Connection | asyncpg.Pool, task_id: uuid.UUID
) -> list[asyncpg.Record] | None:
    """Every delivery of the task, subscriptions' and its callback's (webhook_id NULL),
    newest first; None when no such task. A task has one delivery per matching
    subscription and at most one callback, so there is no paging."""
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tasks WHERE id = $1)", task_id):
        return None
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE task_id = $1
        ORDER BY created_at DESC, id DESC""",  # noqa: S608
        task_id,
    )
    return rows


async def get_delivery(
    conn: asyncpg.Connection | asyncpg.Pool, delivery_id: uuid.UUID
) -> tuple[asyncpg.Record, list[asyncpg.Record]] | None:
    """A delivery with its body and its attempts, oldest first."""
    row = await conn.fetchrow(
        f"SELECT {DELIVERY_COLUMNS}, body FROM webhook_deliveries WHERE id = $1",  # noqa: S608
        delivery_id,
    )
    if row is None:
        return None
    attempts = await conn.fetch(
        f"SELECT {ATTEMPT_COLUMNS} FROM webhook_attempts WHERE delivery_id = $1 ORDER BY id",  # noqa: S608
        delivery_id,
    )
    return row, attempts


# A failed delivery starts over: due now, with a full budget of attempts (the earlier
# ones stay in its history). The NOTIFY wakes a worker; it commits with the change.
_REPLAY = f"""
WITH replayed AS (
    UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = now()
    WHERE {{where}} AND status = 'failed'
    RETURNING {DELIVERY_COLUMNS}
), woken AS (
    SELECT pg_notify('{WEBHOOK_CHANNEL}', '') FROM (SELECT 1 FROM replayed LIMIT 1) AS any_row
)
SELECT replayed.*, (SELECT count(*) FROM woken) AS woken FROM replayed
"""  # noqa: S608 - a constant


async def replay_delivery(
    conn: asyncpg.Connection | asyncpg.Pool, delivery_id: uuid.UUID
) -> asyncpg.Record | None:
    """The delivery, pending again, if it was failed; else None."""
    return await conn.fetchrow(_REPLAY.format(where="id = $1"), delivery_id)


async def replay_failed(conn: asyncpg.Connection | asyncpg.Pool, webhook_id: uuid.UUID) -> int:
    """Every failed delivery of the subscription, pending again; how many."""
    rows = await conn.fetch(_REPLAY.format(where="webhook_id = $1"), webhook_id)
    return len(rows)


# The worker's claim. Due pending rows, oldest due first, skipping rows another worker
# holds; each is leased by moving next_attempt_at past the attempt's timeout (plus a
# margin) and its attempt counted, in this short transaction. A worker that dies
# mid-send commits nothing more: the row falls due again when the lease runs out and
# another worker sends it again (at least once). Counting at the claim bounds the tries
# even of a destination that kills the worker every time: a due row whose attempts
# already reached the limit ($3) is not leased again but failed here, with an attempt
# row saying why, since no worker recorded an outcome for its last attempt (it died,
# or its record kept failing) and nothing else would ever settle it.
#
# The body leaves as text, the bytes the worker sends and signs as they are: decoded by
# the pool's jsonb codec, a body jsonb holds but the codec refuses (a number beyond a
# double's range, written by hand) would fail the whole claim, every time.
#
# The url and secrets are the subscription's current ones (a fixed URL or a rotation
# applies to pending retries); a callback (no subscription) keeps its own url and is
# signed with WEBHOOK_CALLBACK_SECRET by the worker.
_CLAIM = """
WITH due AS (
    SELECT id FROM webhook_deliveries
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), abandoned AS (
    UPDATE webhook_deliveries AS d SET status = 'failed'
    FROM due WHERE d.id = due.id AND d.attempts >= $3
    RETURNING d.id, d.attempts
), abandoned_attempts AS (
    INSERT INTO webhook_attempts (delivery_id, attempt, latency_ms, error)
    SELECT id, attempts, 0,
           'abandoned: no outcome recorded after ' || attempts || ' attempts'
    FROM abandoned
), leased AS (
    UPDATE webhook_deliveries AS d
    SET next_attempt_at = now() + make_interval(secs => $2::float8), attempts = d.attempts + 1
    FROM due WHERE d.id = due.id AND d.attempts < $3
    RETURNING d.id, d.webhook_id, d.url, d.event, d.body, d.attempts
)
SELECT leased.id, leased.event, leased.body::text AS body, leased.attempts, leased.webhook_id,
       coalesce(w.url, leased.url) AS url, w.secret,
       CASE WHEN w.previous_secret_expires_at > now() THEN w.previous_secret END
           AS previous_secret
FROM leased LEFT JOIN webhooks AS w ON w.id = leased.webhook_id
"""


async def claim_due(
    conn: asyncpg.Connection, limit: int, lease: float, max_attempts: int
) -> list[asyncpg.Record]:
    """Lease up to ``limit`` due deliveries for ``lease`` seconds, failing (not leasing)
    those that already had ``max_attempts`` attempts."""
    rows: list[asyncpg.Record] = await conn.fetch(_CLAIM, limit, lease, max_attempts)
    return rows


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    delivery_id: uuid.UUID
    attempt: int
    status_code: int | None
    latency_ms: float
    error: str | None
    response_body: str | None
    delivered: bool
    retry_in: float | None  # seconds until the next attempt; None: no more attempts


# The attempt is recorded, and its delivery settled, only while the delivery is still
# this attempt's: a worker whose lease ran out (and whose row another worker claimed
# again, counting another attempt) records what it saw but changes nothing.
_RECORD_ATTEMPT = """
WITH attempt AS (
    INSERT INTO webhook_attempts
        (delivery_id, attempt, status_code, latency_ms, error, response_body)
    VALUES ($1, $2, $3, $4, $5, $6)
)
UPDATE webhook_deliveries SET
    status = CASE WHEN $7 THEN 'delivered' WHEN $8::float8 IS NULL THEN 'failed'
                  ELSE 'pending' END,
    delivered_at = CASE WHEN $7 THEN now() END,
    next_attempt_at = CASE WHEN $8::float8 IS NULL THEN next_attempt_at
                           ELSE now() + make_interval(secs => $8::float8) END
WHERE id = $1 AND attempts = $2 AND status = 'pending'
RETURNING status
"""


async def record_attempt(
    conn: asyncpg.Connection | asyncpg.Pool, record: AttemptRecord
) -> str | None:
    """Store the attempt and settle its delivery; the delivery's new status, or None
    when it had moved on (another worker's attempt, a replay)."""
    status: str | None = await conn.fetchval(
        _RECORD_ATTEMPT,
        record.delivery_id,
        record.attempt,
        record.status_code,
        record.latency_ms,
        record.error,
        record.response_body,
        record.delivered,
        record.retry_in,
    )
    return status


async def pending_backlog(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    """Pending deliveries (due or waiting out a backoff)."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'"
    )
    return count
