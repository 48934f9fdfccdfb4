"""The task events hub's fan-out, without a connection: what a relay's batch flip does to
the subscribers' queues."""

from __future__ import annotations

import uuid

from taskbox.api.task_events import RESYNC, EventFilter, TaskEventHub
from taskbox.db.settings import DatabaseSettings
from taskbox.db.states import TaskStatus
from taskbox.db.task_events import TaskEvent

# About what one ~6 kB notification of a relay's NEW -> PENDING flip carries.
PER_NOTIFICATION = 85


def _notification(status: TaskStatus = TaskStatus.PENDING) -> list[TaskEvent]:
    return [TaskEvent(uuid.uuid4(), status, "echo", "default") for _ in range(PER_NOTIFICATION)]


def _hub() -> TaskEventHub:
    return TaskEventHub(DatabaseSettings(), max_subscribers=100)


def test_a_batch_flip_reaches_a_stream_whole() -> None:
    """Review finding: a 500-row flip (six notifications, 500 events) overflowed a
    stream's 256-event queue before its task ran once: every dashboard stream was told
    it fell behind and closed. A stream now queues a notification's events as one item."""
    hub = _hub()
    stream = hub.subscribe(event_filter=EventFilter())
    for _ in range(6):
        hub._dispatch(_notification())
    assert not stream.overflowed
    batches = [stream.next_nowait() for _ in range(6)]
    assert all(isinstance(b, tuple) and len(b) == PER_NOTIFICATION for b in batches)
    assert stream.next_nowait() is None


def test_a_stream_that_fell_behind_is_sent_nothing_more() -> None:
    """Once overflowed, a stream holds only RESYNC and ends when it reads it: refilling
    its queue meanwhile would spend the event loop's time on a client that is leaving."""
    hub = _hub()
    stream = hub.subscribe(event_filter=EventFilter())
    for _ in range(300):
        hub._dispatch(_notification())
    assert stream.overflowed
    assert stream.next_nowait() is RESYNC
    assert stream.next_nowait() is None


def test_a_waiter_gets_only_its_tasks_events() -> None:
    hub = _hub()
    events = _notification(TaskStatus.DONE)
    waiter = hub.subscribe(events[7].task_id)
    hub._dispatch(events)
    assert waiter.next_nowait() == events[7]
    assert waiter.next_nowait() is None
