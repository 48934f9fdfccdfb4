"""The task state machine: which status may follow which.

Every SQL transition in ``db/`` is a conditional UPDATE whose ``WHERE status ...``
guard must be one of the edges listed here; the unit tests pin the table down. The
cancel is a function of migration 0004 (the api role may run it but update nothing
itself), which spells out CANCEL_NOW and CANCEL_LATER; tests/integration/test_roles.py
holds it to them for every status.
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    NEW = "NEW"
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


S = TaskStatus

# target status -> the statuses it may be reached from
_SOURCES: dict[TaskStatus, frozenset[TaskStatus]] = {
    # the relay's publish was refused (undoing its flip); operator replay; retry,
    # graceful release at shutdown or rescue of a running task; the dead-letter watch
    S.NEW: frozenset({S.PENDING, S.PROCESSING, S.FAILED, S.DONE, S.CANCELLED}),
    S.PENDING: frozenset({S.NEW}),  # publish confirmed
    # a consumer claims a published task (NEW while the relay's commit is in flight),
    # or re-claims one whose heartbeat went stale
    S.PROCESSING: frozenset({S.NEW, S.PENDING, S.PROCESSING}),
    S.DONE: frozenset({S.PROCESSING}),
    S.FAILED: frozenset({S.PROCESSING}),
    S.CANCELLED: frozenset({S.NEW, S.PENDING, S.PROCESSING}),
}

TERMINAL: frozenset[TaskStatus] = frozenset({S.DONE, S.FAILED, S.CANCELLED})

# Cancelling a task that has not started is immediate; a running one is only flagged.
CANCEL_NOW: frozenset[TaskStatus] = frozenset({S.NEW, S.PENDING})
CANCEL_LATER: frozenset[TaskStatus] = frozenset({S.PROCESSING})

# Operator replay (relay CLI): DONE and CANCELLED only when forced, PROCESSING never.
REPLAYABLE: frozenset[TaskStatus] = frozenset({S.PENDING, S.FAILED})
REPLAYABLE_FORCED: frozenset[TaskStatus] = REPLAYABLE | {S.DONE, S.CANCELLED}


def sources(target: TaskStatus) -> frozenset[TaskStatus]:
    """Statuses from which ``target`` may be entered."""
    return _SOURCES[target]


def can_transition(current: TaskStatus, target: TaskStatus) -> bool:
    return current in _SOURCES[target]
