"""Queries of retention: delete published outbox rows and finished tasks once old enough.

Deletes go in small batches, each its own short transaction, so a sweep never holds
many locks or one long transaction against the relay's claims. Only one process
sweeps at a time: the sweeper holds a session-level advisory lock (advisory locks are
per database, so two Taskbox databases on one server do not block each other).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg

from taskbox.db.states import TERMINAL

# Any constant works as long as nothing else in this database uses it; pg_locks shows it
# as an advisory lock with classid 0 and objid 2052849665.
RETENTION_LOCK = 0x7A5C_0001

_TRY_LOCK = "SELECT pg_try_advisory_lock($1)"
_LOCK = "SELECT pg_advisory_lock($1)"
_UNLOCK = "SELECT pg_advisory_unlock($1)"

# Nothing indexes published_at (an index would cost every publish), so a sweep walks
# the primary key instead. Ids grow with created_at and a row is published after it was
# created, so every deletable row lies below the first row created after the cutoff:
# finding that boundary scans only the old rows at the low end of the table, the very
# rows the sweep deletes. The batches then walk up from the last id they deleted, so
# they never re-read rows (or dead index entries) an earlier batch passed: a sweep
# costs what it deletes, not the size of the outbox. Unpublished rows stay, however old.
_OUTBOX_BOUNDARY = """
SELECT id FROM outbox WHERE created_at >= now() - make_interval(secs => $1) ORDER BY id LIMIT 1
"""

_DELETE_PUBLISHED = """
WITH doomed AS (
    SELECT id FROM outbox
    WHERE id > $3 AND id < $4
      AND published_at IS NOT NULL
      AND published_at < now() - make_interval(secs => $1)
    ORDER BY id
    LIMIT $2
), deleted AS (
    DELETE FROM outbox WHERE id IN (SELECT id FROM doomed) RETURNING id
)
SELECT count(*) AS deleted, max(id) AS last FROM deleted
"""

# Finished tasks older than the retention, one status at a time down the
# (status, created_at DESC, id DESC) index, resuming below the last deleted key. A task
# finishes after it was created, so created_at narrows the range before finished_at is
# checked. Their outbox rows go with them (ON DELETE CASCADE, via ix_outbox_task_id),
# and so would their webhook deliveries: a task with a delivery still pending stays
# until it is delivered or failed (ix_webhook_deliveries_task_id answers each check),
# else retention would drop an outcome its receiver has not heard of yet.
_DELETE_FINISHED_TASKS = """
WITH doomed AS (
    SELECT id FROM tasks
    WHERE status = $3
      AND created_at < now() - make_interval(secs => $1)
      AND (created_at, id) < ($4, $5)
      AND finished_at < now() - make_interval(secs => $1)
      AND NOT EXISTS (
          SELECT 1 FROM webhook_deliveries AS d
          WHERE d.task_id = tasks.id AND d.status = 'pending'
      )
    ORDER BY created_at DESC, id DESC
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM tasks WHERE id IN (SELECT id FROM doomed) RETURNING created_at, id
)
SELECT count(*) AS deleted,
       (array_agg(created_at ORDER BY created_at, id))[1] AS last_created_at,
       (array_agg(id ORDER BY created_at, id))[1] AS last_id
FROM deleted
"""

# Consumers gone for long (their row unrefreshed): a small table, one statement.
_DELETE_GONE_CONSUMERS = """
DELETE FROM queue_consumers WHERE seen_at < now() - make_interval(secs => $1)
"""

_TERMINAL = sorted(TERMINAL)
_MAX_ID = 2**63 - 1
_TOP_KEY = (datetime.max.replace(tzinfo=UTC), uuid.UUID(int=2**128 - 1))


async def try_lock(conn: asyncpg.Connection) -> bool:
    """Take the sweeper's lock for this session if nobody holds it."""
    return bool(await conn.fetchval(_TRY_LOCK, RETENTION_LOCK))


async def lock(conn: asyncpg.Connection) -> None:
    """Take the sweeper's lock, waiting for the holder to let go."""
    await conn.execute(_LOCK, RETENTION_LOCK)


async def unlock(conn: asyncpg.Connection) -> None:
    await conn.execute(_UNLOCK, RETENTION_LOCK)


async def delete_published_outbox(
    conn: asyncpg.Connection, older_than: float, batch: int
) -> AsyncIterator[int]:
    """Delete outbox rows published more than ``older_than`` seconds ago, ``batch`` rows
    per statement (each its own transaction); yields each batch's count."""
    boundary = await conn.fetchval(_OUTBOX_BOUNDARY, older_than)
    before = _MAX_ID if boundary is None else int(boundary)
    after = 0
    while True:
        row = await conn.fetchrow(_DELETE_PUBLISHED, older_than, batch, after, before)
        assert row is not None
        if row["deleted"] == 0:
            return
        yield int(row["deleted"])
        if row["deleted"] < batch:
            return
        after = int(row["last"])


async def delete_gone_consumers(conn: asyncpg.Connection, older_than: float) -> int:
    """Delete the rows of consumers not seen for ``older_than`` seconds; their count."""
    status: str = await conn.execute(_DELETE_GONE_CONSUMERS, older_than)
    return int(status.rsplit(" ", 1)[-1])


async def delete_finished_tasks(
    conn: asyncpg.Connection, older_than: float, batch: int
) -> AsyncIterator[int]:
    """Delete tasks finished more than ``older_than`` seconds ago (and their outbox rows),
    ``batch`` tasks per statement; yields each batch's count."""
    for status in _TERMINAL:
        below = _TOP_KEY
        while True:
            row = await conn.fetchrow(_DELETE_FINISHED_TASKS, older_than, batch, status, *below)
            assert row is not None
            if row["deleted"] == 0:
                break
            yield int(row["deleted"])
            if row["deleted"] < batch:
                break
            below = (row["last_created_at"], row["last_id"])
