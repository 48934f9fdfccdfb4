"""Long polls and server-sent event streams of tasks, over the task events hub.

A long poll or a stream registers with the hub BEFORE it reads the task: a change
committed after the read then always reaches it, and one committed before is in the
read. Re-reads happen only when the hub delivered something for the task (or asked
everyone to re-read after a reconnect), never on a timer.

Streams carry no event ids: a stream cannot replay what it missed, and a reconnecting
per-task stream starts with the task's current state anyway, so ``Last-Event-ID`` would
promise nothing. ``retry:`` tells EventSource how long to wait before it reconnects.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from taskbox.api.service import TaskNotFound
from taskbox.api.task_events import RESYNC, Subscription, TaskEventHub
from taskbox.db.states import TERMINAL
from taskbox.db.task_events import TaskEvent


@dataclass(frozen=True, slots=True)
class StreamLimits:
    heartbeat: float  # seconds between two comment lines on a quiet stream
    max_stream: float  # seconds a stream stays open


ReadTask = Callable[[uuid.UUID], Awaitable[Mapping[str, Any]]]

# What EventSource waits before reconnecting after a stream ends or breaks.
RECONNECT_MS = 3000
EVENT_STREAM_HEADERS = {
    # Neither a cache nor a buffering proxy (nginx) may hold the events back.
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}


async def wait_for_outcome(
    hub: TaskEventHub, read: ReadTask, task_id: uuid.UUID, wait: float
) -> Mapping[str, Any]:
    """The task once terminal, or as it is after ``wait`` seconds."""
    subscription = hub.subscribe(task_id)
    try:
        row = await read(task_id)
        deadline = asyncio.get_running_loop().time() + wait
        while row["status"] not in TERMINAL:
            left = deadline - asyncio.get_running_loop().time()
            delivery = await subscription.next(left)
            if delivery is None:
                # Read again at the deadline: a change made while the hub's connection was
                # failing but not yet found dead was never heard, and the answer should
                # be the task as it is now. One query per long poll that times out.
                row = await read(task_id)
                break
            _drain(subscription)
            row = await read(task_id)
        return row
    finally:
        hub.unsubscribe(subscription)


class ClientGone(Exception):
    """The client closed its connection while its long poll waited."""


async def unless_disconnected(
    receive: Callable[[], Awaitable[Mapping[str, Any]]],
    waiting: Awaitable[Mapping[str, Any]],
) -> Mapping[str, Any]:
    """``waiting``'s answer; ClientGone (and ``waiting`` cancelled, its slot freed) if the
    client disconnects first. A client that gives up on a long wait would otherwise hold
    one of TASK_WAIT_MAX_WAITERS until the deadline.

    The request has no body left to read (a GET), so ``receive`` has nothing to say but
    the disconnect.
    """

    async def until_gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    answer = asyncio.ensure_future(waiting)
    gone = asyncio.ensure_future(until_gone())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answer, gone):
            if not task.done():
                task.cancel()
        # Let the cancelled long poll run its clean-up (the unsubscribe) before returning.
        await asyncio.gather(answer, gone, return_exceptions=True)
    if not answer.done() or answer.cancelled():
        raise ClientGone
    return answer.result()


def _drain(subscription: Subscription) -> None:
    """Drop what else is queued: one read covers all of it."""
    while subscription.next_nowait() is not None:
        pass


def _message(event: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def task_message(task_id: uuid.UUID | str, status: str, task_type: str, queue: str) -> bytes:
    return _message(
        "task", {"id": str(task_id), "status": status, "type": task_type, "queue": queue}
    )


def _row_message(row: Mapping[str, Any]) -> bytes:
    return task_message(row["id"], row["status"], row["type"], row["queue"])


def _event_message(event: TaskEvent) -> bytes:
    return task_message(event.task_id, event.status, event.type, event.queue)


_HEARTBEAT = b": keep-alive\n\n"


async def one_task_stream(
    hub: TaskEventHub,
    read: ReadTask,
    subscription: Subscription,
    first: Mapping[str, Any],
    *,
    heartbeat: float,
    lifetime: float,
) -> AsyncIterator[bytes]:
    """The task's state now, then each status it takes, until a terminal one.

    ``subscription`` was registered before ``first`` was read; the stream owns it from
    here and gives it back however it ends (a client that went away included).
    """
    try:
        yield f"retry: {RECONNECT_MS}\n".encode() + _row_message(first)
        last = first["status"]
        if last in TERMINAL:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + lifetime
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return
            delivery = await subscription.next(min(heartbeat, left))
            if delivery is None:
                yield _HEARTBEAT
                continue
            if delivery is RESYNC:
                try:
                    row = await read(first["id"])
                except TaskNotFound:  # deleted by retention meanwhile
                    return
                message, status = _row_message(row), row["status"]
            else:
                assert isinstance(delivery, TaskEvent)
                message, status = _event_message(delivery), delivery.status
            # The change that committed between the subscription and the first read is
            # heard too, and is no news.
            if status == last:
                continue
            last = status
            yield message
            if status in TERMINAL:
                return
    finally:
        hub.unsubscribe(subscription)


async def many_tasks_stream(
    hub: TaskEventHub,
    subscription: Subscription,
    *,
    heartbeat: float,
    lifetime: float,
) -> AsyncIterator[bytes]:
    """Every matching change, as it is committed, for ``lifetime`` seconds.

    After a reconnect of the hub, or when this client fell too far behind, changes may
    have been missed: a ``resync`` event says so (a dashboard then lists afresh); a
    client that fell behind is also disconnected, since it cannot keep up.
    """
    try:
        yield f"retry: {RECONNECT_MS}\n".encode() + b": subscribed\n\n"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + lifetime
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return
            delivery = await subscription.next(min(heartbeat, left))
            if delivery is None:
                yield _HEARTBEAT
            elif delivery is RESYNC:
                reason = "fell behind" if subscription.overflowed else "reconnected"
                yield _message("resync", {"reason": reason})
                if subscription.overflowed:
                    return
            elif isinstance(delivery, tuple):
                wanted = subscription.filter
                messages = [
                    _event_message(event)
                    for event in delivery
                    if wanted is None or wanted.matches(event)
                ]
                if messages:
                    yield b"".join(messages)
    finally:
        hub.unsubscribe(subscription)
