"""Bulk actions: cancel or retry every task a filter selects, a chunk at a time, audited.

The one implementation behind ``POST /api/v1/tasks/cancel|retry`` and ``taskbox tasks
cancel|retry``. An action is a ``task_actions`` row (who, why, what it selected, its
progress) and a walk over the selected tasks, oldest first, keyset-paged on
(created_at, id), which neither action changes. Each chunk is its own short
transaction (the chunk's change and the row's progress together), so no transaction
holds many rows for long, and a crash leaves every committed chunk done and counted.
The walk is bounded by the action's start (``created_before`` is at most that), so
tasks created meanwhile are not chased and the action ends.

A task's change is the ordinary one: a cancel is ``cancel_task()`` of migration 0004
for each task (the single ``DELETE /api/v1/tasks/{id}``'s function, so a bulk cancel
fires whatever a single one fires), a retry is the operator's replay
(:func:`db.replay.replay_chunk`, ``replay_tasks()``). Tasks in a status the action does
not change are skipped and counted, as are tasks that changed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpg

from taskbox.db import outbox
from taskbox.db.replay import Selection, count_selected, replay_chunk, replayable, select_page
from taskbox.db.states import CANCEL_LATER, CANCEL_NOW, TaskStatus

Action = Literal["cancel", "retry"]
ACTIONS: tuple[Action, ...] = ("cancel", "retry")
ActionState = Literal["running", "done", "failed"]

# A list of ids travels as one array parameter; bounded so that a request stays small
# and its statement cheap. More tasks than that are chosen by the other criteria.
MAX_IDS = 1000
DEFAULT_CHUNK = 500
MAX_CHUNK = 10_000
SAMPLE_SIZE = 20  # tasks a dry run shows

_CANCELLABLE = CANCEL_NOW | CANCEL_LATER


def changeable(action: Action, *, force: bool = False) -> frozenset[TaskStatus]:
    """The statuses ``action`` changes; tasks in any other are skipped."""
    return _CANCELLABLE if action == "cancel" else replayable(force)


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks an action selects: every criterion given must hold (AND). Selecting
    every task takes ``everything=True``, so that a forgotten filter is a refusal and
    never "all tasks"."""

    statuses: tuple[TaskStatus, ...] = ()
    type: str | None = None
    queue: str | None = None
    created_after: datetime | None = None  # exclusive
    created_before: datetime | None = None  # exclusive
    ids: tuple[uuid.UUID, ...] = ()
    everything: bool = False

    def has_criteria(self) -> bool:
        return bool(
            self.statuses
            or self.ids
            or self.type is not None
            or self.queue is not None
            or self.created_after is not None
            or self.created_before is not None
        )

    def as_json(self) -> dict[str, Any]:
        """The filter as given, for the audit row: criteria not given are left out."""
        shown: dict[str, Any] = {}
        if self.statuses:
            shown["status"] = [s.value for s in self.statuses]
        if self.type is not None:
            shown["type"] = self.type
        if self.queue is not None:
            shown["queue"] = self.queue
        if self.created_after is not None:
            shown["created_after"] = self.created_after.isoformat()
        if self.created_before is not None:
            shown["created_before"] = self.created_before.isoformat()
        if self.ids:
            shown["ids"] = [str(task_id) for task_id in self.ids]
        if self.everything:
            shown["all"] = True
        return shown

    def selection(self, started_at: datetime) -> Selection:
        """The query's selection, bounded by the action's start."""
        bound = started_at
        if self.created_before is not None and self.created_before < bound:
            bound = self.created_before
        return Selection(
            task_ids=list(self.ids),
            statuses=list(self.statuses),
            type=self.type,
            queue=self.queue,
            created_after=self.created_after,
            created_until=bound,
        )


class EmptyFilter(ValueError):
    """A filter without criteria and without ``everything``."""


@dataclass(frozen=True, slots=True)
class BulkRequest:
    action: Action
    filter: TaskFilter
    reason: str
    actor: str
    dry_run: bool = False
    force: bool = False  # retry only: DONE and CANCELLED tasks too, as ``replay --force``
    chunk_size: int = DEFAULT_CHUNK


@dataclass(frozen=True, slots=True)
class TaskAction:
    """A ``task_actions`` row. With ``dry_run``, ``changed`` and ``skipped`` say what the
    action would change and skip; nothing was changed."""

    id: int
    action: str
    filter: dict[str, Any]
    reason: str
    actor: str
    dry_run: bool
    matched: int
    changed: int
    skipped: int
    state: str
    error: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class SampleTask:
    id: uuid.UUID
    status: str
    type: str
    created_at: datetime


@dataclass(slots=True)
class Outcome:
    action: TaskAction
    sample: list[SampleTask] = field(default_factory=list)  # dry run only


_COLUMNS = (
    "id, action, filter, reason, actor, dry_run, matched, changed, skipped, state, error, "
    "started_at, finished_at"
)
_START = f"""
INSERT INTO task_actions (action, filter, reason, actor, dry_run)
VALUES ($1, $2, $3, $4, $5)
RETURNING {_COLUMNS}
"""  # noqa: S608 - constants
_MATCHED = f"UPDATE task_actions SET matched = $2 WHERE id = $1 RETURNING {_COLUMNS}"  # noqa: S608
_PROGRESS = f"""
UPDATE task_actions SET changed = changed + $2, skipped = skipped + $3
WHERE id = $1 RETURNING {_COLUMNS}
"""  # noqa: S608 - constants
_FINISH = f"""
UPDATE task_actions SET state = $2, error = $3, changed = $4, skipped = $5, finished_at = now()
WHERE id = $1 RETURNING {_COLUMNS}
"""  # noqa: S608 - constants
_FAILED = """
UPDATE task_actions SET state = 'failed', error = $2, finished_at = now()
WHERE id = $1 AND state = 'running'
"""
# cancel_task() for each task of the chunk in one statement: the single cancel's
# function, so a bulk cancel changes exactly what as many single cancels would.
_CANCEL_CHUNK = """
SELECT count(*) FROM unnest($1::uuid[]) AS chosen(id), LATERAL public.cancel_task(chosen.id)
"""
_GET = f"SELECT {_COLUMNS} FROM task_actions WHERE id = $1"  # noqa: S608 - constants
_LIST = f"""
SELECT {_COLUMNS} FROM task_actions WHERE id < $1 ORDER BY id DESC LIMIT $2
"""  # noqa: S608 - constants


def _record(row: asyncpg.Record) -> TaskAction:
    values = dict(row)
    if isinstance(values["filter"], str):  # a connection without the pool's JSON codec
        values["filter"] = json.loads(values["filter"])
    return TaskAction(**values)


ChunkDone = Callable[[TaskAction], Awaitable[None] | None]


async def run(
    conn: asyncpg.Connection,
    request: BulkRequest,
    *,
    outbox_channel: str,
    headers: Mapping[str, Any] | None = None,
    on_chunk: ChunkDone | None = None,
) -> Outcome:
    """Record and perform ``request`` on ``conn`` (not in a transaction: each chunk is
    one); ``on_chunk`` sees the row after each committed chunk. ``headers`` go into the
    outbox rows of a retry, after who, why and the action's id."""
    if not (request.filter.has_criteria() or request.filter.everything):
        raise EmptyFilter("choose which tasks, or say everything")
    started = _record(
        await conn.fetchrow(
            _START,
            request.action,
            request.filter.as_json(),
            request.reason,
            request.actor,
            request.dry_run,
        )
    )
    try:
        return await _perform(conn, request, started, outbox_channel, headers or {}, on_chunk)
    except BaseException as exc:
        # Best effort: with the connection gone the row stays 'running', as after a
        # crash; either way its counts are those of the chunks that committed.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.execute(_FAILED, started.id, f"{type(exc).__name__}: {exc}"[:500])
        raise


async def _perform(
    conn: asyncpg.Connection,
    request: BulkRequest,
    started: TaskAction,
    outbox_channel: str,
    headers: Mapping[str, Any],
    on_chunk: ChunkDone | None,
) -> Outcome:
    selection = request.filter.selection(started.started_at)
    matched = await count_selected(conn, selection)
    current = _record(await conn.fetchrow(_MATCHED, started.id, matched))
    statuses = changeable(request.action, force=request.force)
    if request.dry_run:
        would = await _count_changeable(conn, selection, statuses)
        sample = [
            SampleTask(row["id"], row["status"], row["type"], row["created_at"])
            for row in await select_page(conn, selection, SAMPLE_SIZE)
        ]
        skipped = matched - would
        done = _record(await conn.fetchrow(_FINISH, started.id, "done", None, would, skipped))
        return Outcome(done, sample)
    replay_headers = {
        "who": request.actor,
        "why": request.reason,
        "at": started.started_at.isoformat(timespec="seconds"),
        "task_action": started.id,
        **headers,
    }
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        page = await select_page(conn, selection, request.chunk_size, after)
        if not page:
            break
        after = (page[-1]["created_at"], page[-1]["id"])
        ids = [row["id"] for row in page]
        changed, current = await _commit_chunk(conn, request, ids, replay_headers, started.id)
        if request.action == "retry" and changed:
            # Committed: wake the relays now rather than at their next poll.
            await outbox.notify(conn, outbox_channel)
        if on_chunk is not None:
            waited = on_chunk(current)
            if waited is not None:
                await waited
    done = _record(
        await conn.fetchrow(_FINISH, started.id, "done", None, current.changed, current.skipped)
    )
    return Outcome(done)


# A chunk locks up to chunk_size tasks while consumers, relays and single cancels lock
# some of the same ones in their own order: a deadlock is possible, and Postgres then
# rolls one side back. The chunk changed nothing then and may simply run again.
_CHUNK_TRIES = 5


async def _commit_chunk(
    conn: asyncpg.Connection,
    request: BulkRequest,
    ids: Sequence[uuid.UUID],
    headers: dict[str, Any],
    action_id: int,
) -> tuple[int, TaskAction]:
    """Apply the chunk and count it in the action's progress, in one transaction,
    again after a deadlock or serialization failure; how many changed, and the row."""
    for attempt in range(1, _CHUNK_TRIES + 1):
        try:
            async with conn.transaction():
                changed = await _apply(conn, request, ids, headers)
                row = await conn.fetchrow(_PROGRESS, action_id, changed, len(ids) - changed)
            return changed, _record(row)
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
            if attempt == _CHUNK_TRIES:
                raise
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


async def _apply(
    conn: asyncpg.Connection,
    request: BulkRequest,
    ids: Sequence[uuid.UUID],
    headers: dict[str, Any],
) -> int:
    """Change the chunk's tasks; how many changed."""
    if request.action == "cancel":
        return int(await conn.fetchval(_CANCEL_CHUNK, list(ids)))
    result = await replay_chunk(conn, ids, headers, force=request.force)
    return len(result.replayed)


async def _count_changeable(
    conn: asyncpg.Connection, selection: Selection, statuses: frozenset[TaskStatus]
) -> int:
    chosen = set(selection.statuses) & statuses if selection.statuses else statuses
    if not chosen:
        return 0
    narrowed = Selection(
        task_ids=selection.task_ids,
        statuses=sorted(chosen),
        type=selection.type,
        queue=selection.queue,
        created_after=selection.created_after,
        created_until=selection.created_until,
    )
    return await count_selected(conn, narrowed)


async def get(conn: asyncpg.Connection | asyncpg.Pool, action_id: int) -> TaskAction | None:
    row = await conn.fetchrow(_GET, action_id)
    return _record(row) if row is not None else None


async def list_page(
    conn: asyncpg.Connection | asyncpg.Pool, limit: int, before: int | None = None
) -> list[TaskAction]:
    """The newest actions first, keyset-paged on the id: those older than ``before``."""
    rows = await conn.fetch(_LIST, before if before is not None else 2**63 - 1, limit)
    return [_record(row) for row in rows]
