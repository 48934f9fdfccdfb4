"""Queries of the operator's replay: select tasks to send again, replay them in chunks.

A replay is a new ``task.replay`` outbox row plus the task's move back to NEW, in one
transaction per chunk; the relay then publishes the row as usual. The move is one
conditional UPDATE guarded by :data:`db.states.REPLAYABLE` (or ``REPLAYABLE_FORCED``),
in the SQL function ``replay_tasks()`` (migration 0010) that the api's bulk retry
(:mod:`db.actions`) calls too, so a task that changed meanwhile (a consumer claimed
it) is refused, never run twice at once. A replay leaves the lease alone (only a
claim raises it), so a consumer that still believes it owns an older claim stays
fenced out; the task keeps its attempt count, and ``max_attempts`` grows by one if
needed so that a task that used up its attempts gets one more.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from taskbox.db.sql import Parameters
from taskbox.db.states import REPLAYABLE, REPLAYABLE_FORCED, TaskStatus

CANDIDATE_COLUMNS = (
    "id, type, status, attempts, max_attempts, created_at, updated_at, "
    "extract(epoch FROM now() - created_at) AS age, "
    "extract(epoch FROM now() - updated_at) AS idle"
)

# replay_tasks() of migration 0010 (SECURITY DEFINER): the api's bulk retry calls the
# same function, which performs exactly this move and nothing else.
_REPLAY_CHUNK = "SELECT task_id, outbox_id FROM replay_tasks($1::uuid[], $2, $3)"

_CURRENT_STATUS = "SELECT id, status FROM tasks WHERE id = ANY($1::uuid[])"


@dataclass(frozen=True, slots=True)
class Selection:
    """Which tasks to replay; every given criterion must hold (AND)."""

    task_ids: Sequence[uuid.UUID] = ()
    outbox_ids: tuple[int, int] | None = None  # inclusive range of outbox row ids
    statuses: Sequence[TaskStatus] = ()
    type: str | None = None
    queue: str | None = None
    created_after: datetime | None = None  # exclusive, as the API's listing has it
    created_since: datetime | None = None
    created_until: datetime | None = None
    stale_for: float | None = None  # seconds PENDING without being picked up

    def is_empty(self) -> bool:
        return not (
            self.task_ids
            or self.outbox_ids
            or self.statuses
            or self.type is not None
            or self.queue is not None
            or self.created_after is not None
            or self.created_since is not None
            or self.created_until is not None
            or self.stale_for is not None
        )


def _where(selection: Selection, param: Parameters) -> str:
    """The selection as fixed SQL fragments; values travel as parameters."""
    conditions: list[str] = []
    if selection.task_ids:
        conditions.append(f"id = ANY({param(list(selection.task_ids))}::uuid[])")
    if selection.outbox_ids is not None:
        low, high = selection.outbox_ids
        conditions.append(
            "EXISTS (SELECT 1 FROM outbox AS o WHERE o.task_id = tasks.id "  # noqa: S608
            f"AND o.id BETWEEN {param(low)} AND {param(high)})"
        )
    if selection.statuses:
        conditions.append(f"status = ANY({param([s.value for s in selection.statuses])}::text[])")
    if selection.type is not None:
        conditions.append(f"type = {param(selection.type)}")
    if selection.queue is not None:
        conditions.append(f"queue = {param(selection.queue)}")
    if selection.created_after is not None:
        conditions.append(f"created_at > {param(selection.created_after)}")
    if selection.created_since is not None:
        conditions.append(f"created_at >= {param(selection.created_since)}")
    if selection.created_until is not None:
        conditions.append(f"created_at < {param(selection.created_until)}")
    if selection.stale_for is not None:
        # PENDING is "published and confirmed, not yet claimed": a task that stays there
        # is one whose message the broker lost (or a queue nobody consumes).
        stale_for = param(selection.stale_for)
        conditions.append(
            f"status = 'PENDING' AND updated_at < now() - make_interval(secs => {stale_for})"
        )
    return " AND ".join(conditions) if conditions else "true"


async def count_selected(conn: asyncpg.Connection | asyncpg.Pool, selection: Selection) -> int:
    param = Parameters()
    where = _where(selection, param)
    count = await conn.fetchval(
        f"SELECT count(*) FROM tasks WHERE {where}",  # noqa: S608 - fragments are constants
        *param.values,
    )
    return int(count)


async def select_page(
    conn: asyncpg.Connection | asyncpg.Pool,
    selection: Selection,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> list[asyncpg.Record]:
    """The next ``limit`` selected tasks, oldest first, keyset-paged on (created_at, id).

    Paging on a key that never changes lets a long replay walk the selection in
    chunks while it moves the tasks it already passed.
    """
    param = Parameters()
    where = _where(selection, param)
    if after is not None:
        created_at, task_id = after
        where += f" AND (created_at, id) > ({param(created_at)}, {param(task_id)})"
    query = (
        f"SELECT {CANDIDATE_COLUMNS} FROM tasks WHERE {where} "  # noqa: S608 - constants
        f"ORDER BY created_at, id LIMIT {param(limit)}"
    )
    rows: list[asyncpg.Record] = await conn.fetch(query, *param.values)
    return rows


async def missing_task_ids(
    conn: asyncpg.Connection | asyncpg.Pool, task_ids: Sequence[uuid.UUID]
) -> list[uuid.UUID]:
    """The ids among ``task_ids`` that name no task."""
    rows = await conn.fetch(_CURRENT_STATUS, list(task_ids))
    found = {row["id"] for row in rows}
    return [task_id for task_id in task_ids if task_id not in found]


def replayable(force: bool) -> frozenset[TaskStatus]:
    return REPLAYABLE_FORCED if force else REPLAYABLE


@dataclass(slots=True)
class ChunkResult:
    replayed: dict[uuid.UUID, int] = field(default_factory=dict)  # task id -> new outbox id
    # task id -> its status now, for the tasks the guarded UPDATE did not move (None: gone)
    refused: dict[uuid.UUID, TaskStatus | None] = field(default_factory=dict)


async def replay_chunk(
    conn: asyncpg.Connection,
    task_ids: Sequence[uuid.UUID],
    headers: dict[str, Any],
    *,
    force: bool,
) -> ChunkResult:
    """Replay these tasks in one transaction: new outbox rows, tasks back to NEW."""
    result = ChunkResult()
    async with conn.transaction():
        rows = await conn.fetch(_REPLAY_CHUNK, list(task_ids), force, headers)
        result.replayed = {row["task_id"]: row["outbox_id"] for row in rows}
        others = [task_id for task_id in task_ids if task_id not in result.replayed]
        if others:
            current = {
                row["id"]: TaskStatus(row["status"])
                for row in await conn.fetch(_CURRENT_STATUS, others)
            }
            result.refused = {task_id: current.get(task_id) for task_id in others}
    return result
