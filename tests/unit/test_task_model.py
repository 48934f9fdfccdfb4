"""The task state machine of db/states.py, pinned down pair by pair.

The expected table is written out here by hand from the design's state machine and the
SQL in db/, not derived from the module, so a change to the rules has to change this
file too.
"""

from __future__ import annotations

import itertools

import pytest

from taskbox.db import states
from taskbox.db.states import TaskStatus

NEW = TaskStatus.NEW
PENDING = TaskStatus.PENDING
PROCESSING = TaskStatus.PROCESSING
DONE = TaskStatus.DONE
FAILED = TaskStatus.FAILED
CANCELLED = TaskStatus.CANCELLED

# (current, target) pairs that are allowed, with the reason each one exists.
ALLOWED: dict[tuple[TaskStatus, TaskStatus], str] = {
    (NEW, PENDING): "relay published and the broker confirmed",
    (NEW, PROCESSING): "consumer claims while the relay's NEW -> PENDING commit is in flight",
    (NEW, CANCELLED): "DELETE before the task was published",
    (PENDING, NEW): "relay refusal (nack/return/timeout) hands the task back, or the "
    "dead-letter watch sends it again",
    (PENDING, PROCESSING): "consumer claim",
    (PENDING, CANCELLED): "DELETE before a consumer claimed it",
    (PROCESSING, NEW): "retryable error, graceful release at shutdown, or rescue with "
    "attempts left",
    (PROCESSING, PROCESSING): "re-claim of a task whose heartbeat went stale",
    (PROCESSING, DONE): "handler succeeded",
    (PROCESSING, FAILED): "permanent error or attempts exhausted",
    (PROCESSING, CANCELLED): "cancel_requested honoured by the consumer",
    (DONE, NEW): "forced operator replay",
    (FAILED, NEW): "operator replay",
    (CANCELLED, NEW): "forced operator replay",
}

ALL_PAIRS = list(itertools.product(list(TaskStatus), repeat=2))


def test_there_are_six_statuses_with_their_wire_values() -> None:
    assert [s.value for s in TaskStatus] == [
        "NEW",
        "PENDING",
        "PROCESSING",
        "DONE",
        "FAILED",
        "CANCELLED",
    ]
    assert len(ALL_PAIRS) == 36


def test_expected_table_has_fourteen_allowed_and_twenty_two_forbidden_pairs() -> None:
    # Guards the hand-written table itself against typos.
    assert len(ALLOWED) == 14
    assert len([p for p in ALL_PAIRS if p not in ALLOWED]) == 22


@pytest.mark.parametrize(
    ("current", "target"), ALL_PAIRS, ids=[f"{c.value}->{t.value}" for c, t in ALL_PAIRS]
)
def test_transition(current: TaskStatus, target: TaskStatus) -> None:
    expected = (current, target) in ALLOWED
    assert states.can_transition(current, target) is expected
    assert (current in states.sources(target)) is expected


@pytest.mark.parametrize("target", list(TaskStatus), ids=[s.value for s in TaskStatus])
def test_sources_lists_exactly_the_allowed_predecessors(target: TaskStatus) -> None:
    expected = frozenset(c for (c, t) in ALLOWED if t is target)
    assert states.sources(target) == expected


@pytest.mark.parametrize("terminal", [DONE, FAILED, CANCELLED])
def test_terminal_statuses_only_leave_through_replay_to_new(terminal: TaskStatus) -> None:
    reachable = {t for t in TaskStatus if states.can_transition(terminal, t)}
    assert reachable == {NEW}


def test_terminal_set() -> None:
    assert frozenset({DONE, FAILED, CANCELLED}) == states.TERMINAL


def test_cancel_now_and_cancel_later_sets() -> None:
    assert frozenset({NEW, PENDING}) == states.CANCEL_NOW
    assert frozenset({PROCESSING}) == states.CANCEL_LATER
    assert not states.CANCEL_NOW & states.CANCEL_LATER
    # Everything that is not terminal can be cancelled one way or the other.
    cancellable = states.CANCEL_NOW | states.CANCEL_LATER
    assert cancellable == frozenset(TaskStatus) - states.TERMINAL


def test_every_cancellable_status_may_become_cancelled() -> None:
    for status in states.CANCEL_NOW | states.CANCEL_LATER:
        assert states.can_transition(status, CANCELLED)
    for status in states.TERMINAL:
        assert not states.can_transition(status, CANCELLED)


def test_replayable_sets() -> None:
    assert frozenset({PENDING, FAILED}) == states.REPLAYABLE
    assert frozenset({PENDING, FAILED, DONE, CANCELLED}) == states.REPLAYABLE_FORCED
    assert PROCESSING not in states.REPLAYABLE_FORCED
    assert NEW not in states.REPLAYABLE_FORCED


def test_every_replayable_status_may_go_back_to_new() -> None:
    for status in states.REPLAYABLE_FORCED:
        assert states.can_transition(status, NEW), status
