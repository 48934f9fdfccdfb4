"""The api process's one LISTEN connection for task events, and who waits on them.

Long polls (``?wait=``) and event streams learn that a task changed from the
notifications migration 0008's trigger sends (db.task_events), not by polling: however
many requests wait, the process holds one dedicated connection (outside the pool, which
could hand a connection back with its LISTEN gone) and runs no query until something
they wait for changed.

Subscribers register before they read the task, so a change committed between their
read and their registration still reaches them. Each gets a queue of events; ``RESYNC``
in it means "what you know may be stale, read the database": it is put in every queue
on each (re)connect, because notifications sent while the connection was down are lost
for good. The connection proves itself alive by notifying itself on a timer (as the
relay's listener does), so a half-dead link is replaced rather than trusted.

The number of subscribers is capped per process (``TooManyWaiters``, answered 503):
each holds an open request, and the cap keeps room under the connection limit for the
requests that do not wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential_jitter

from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.pool import connect
from taskbox.db.settings import DatabaseSettings
from taskbox.db.task_events import CHANNEL, TaskEvent, parse_events

log = logging.getLogger(__name__)

APPLICATION_NAME_PREFIX = "taskbox-api-events"


class _Resync:
    def __repr__(self) -> str:
        return "RESYNC"


RESYNC: Final = _Resync()

# A stream receives each notification's events as one batch and filters them itself:
# the listener's callback then does one put per stream and notification, whatever the
# batch's size, and the filtering runs in the streams' own tasks, between requests.
EventBatch = tuple[TaskEvent, ...]
Delivery = TaskEvent | EventBatch | _Resync

# What a subscriber may have queued and not taken: a waiter's events, a stream's batches
# (one per notification, up to some 6 kB of events each).
_QUEUE_SIZE = 256


class TooManyWaiters(Exception):
    """Every subscriber slot of this process is taken (TASK_WAIT_MAX_WAITERS)."""


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a stream wants; an empty collection matches everything."""

    types: Collection[str] = ()
    queues: Collection[str] = ()
    statuses: Collection[str] = ()

    def matches(self, event: TaskEvent) -> bool:
        return (
            (not self.types or event.type in self.types)
            and (not self.queues or event.queue in self.queues)
            and (not self.statuses or event.status in self.statuses)
        )


class Subscription:
    """One waiter (a task id) or one stream (a filter) and the events it has not taken.

    The queue is bounded: a subscriber that does not keep up has its backlog replaced
    by ``RESYNC`` (for a waiter: re-read the task) and ``overflowed`` set (a stream
    cannot re-read what it missed, and says so). A stream that overflowed is sent
    nothing more: it ends once it has read the ``RESYNC``, and filling and emptying its
    queue again meanwhile would only spend the event loop's time.
    """

    def __init__(self, task_id: uuid.UUID | None, event_filter: EventFilter | None) -> None:
        self.task_id = task_id
        self.filter = event_filter
        self.overflowed = False
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=_QUEUE_SIZE)

    def put(self, item: Delivery) -> None:
        if self.overflowed and self.task_id is None:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(RESYNC)

    def next_nowait(self) -> Delivery | None:
        return None if self._queue.empty() else self._queue.get_nowait()

    async def next(self, within: float) -> Delivery | None:
        """The next event or ``RESYNC``; None when ``within`` seconds passed without."""
        if within <= 0:
            return self.next_nowait()
        try:
            async with asyncio.timeout(within):
                return await self._queue.get()
        except TimeoutError:
            return None


class TaskEventHub:
    def __init__(
        self,
        settings: DatabaseSettings,
        *,
        max_subscribers: int,
        check_interval: float = 5.0,
    ) -> None:
        self._settings = settings
        self._max_subscribers = max_subscribers
        self._check_interval = check_interval
        self._application_name = f"{APPLICATION_NAME_PREFIX}-{os.getpid()}"
        self._check_channel = f"{CHANNEL}_check_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self._by_task: dict[uuid.UUID, set[Subscription]] = {}
        self._streams: set[Subscription] = set()
        self._count = 0
        self._echo: asyncio.Queue[str] = asyncio.Queue()
        self._lost = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self.connected = False
        self.reconnects = 0

    @property
    def subscribers(self) -> int:
        return self._count

    # ------------------------------------------------------------------ subscribers

    def subscribe(
        self, task_id: uuid.UUID | None = None, event_filter: EventFilter | None = None
    ) -> Subscription:
        """A waiter on ``task_id``, or a stream of the events ``event_filter`` matches."""
        if self._count >= self._max_subscribers:
            raise TooManyWaiters(
                f"this api process already serves {self._max_subscribers} waiting requests "
                "and event streams (TASK_WAIT_MAX_WAITERS); retry shortly"
            )
        subscription = Subscription(task_id, event_filter)
        if task_id is not None:
            self._by_task.setdefault(task_id, set()).add(subscription)
        else:
            self._streams.add(subscription)
        self._count += 1
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription.task_id is not None:
            waiters = self._by_task.get(subscription.task_id)
            if waiters is None or subscription not in waiters:
                return
            waiters.discard(subscription)
            if not waiters:
                del self._by_task[subscription.task_id]
        elif subscription in self._streams:
            self._streams.discard(subscription)
        else:
            return
        self._count -= 1

    def _dispatch(self, events: list[TaskEvent]) -> None:
        if self._by_task:
            for event in events:
                for waiter in self._by_task.get(event.task_id, ()):
                    waiter.put(event)
        if self._streams:
            batch = tuple(events)
            for stream in self._streams:
                stream.put(batch)

    def _resync_all(self) -> None:
        for waiters in self._by_task.values():
            for waiter in waiters:
                waiter.put(RESYNC)
        for stream in self._streams:
            stream.put(RESYNC)

    # ------------------------------------------------------------------ the connection

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == self._check_channel:
            self._echo.put_nowait(payload)
            return
        try:
            events = parse_events(payload)
        except ValueError as exc:
            log.warning("task events payload not understood: %s", exc)
            self._resync_all()
            return
        self._dispatch(events)

    def _on_terminated(self, _conn: Any) -> None:
        self._lost.set()

    async def _connect(self) -> asyncpg.Connection:
        async for attempt in AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.1, max=5),
            stop=stop_never,
            retry=retry_if_exception_type((*TRANSIENT_DB_ERRORS, asyncpg.PostgresError)),
            before_sleep=lambda state: log.warning(
                "task events connection failed (%s); retrying",
                state.outcome and state.outcome.exception(),
            ),
            reraise=True,
        ):
            with attempt:
                conn = await connect(
                    self._settings, server_settings={"application_name": self._application_name}
                )
                try:
                    await conn.add_listener(CHANNEL, self._on_notify)
                    await conn.add_listener(self._check_channel, self._on_notify)
                except BaseException:
                    conn.terminate()
                    raise
                conn.add_termination_listener(self._on_terminated)
                return conn
        raise AssertionError("unreachable")

    async def _alive(self, conn: asyncpg.Connection) -> bool:
        token = uuid.uuid4().hex
        try:
            # The NOTIFY's round trip inside the bound too: on a connection that went
            # silent (a cut network) it would otherwise wait for the command timeout,
            # and notifications meanwhile are lost without anyone re-reading.
            async with asyncio.timeout(self._check_interval):
                await conn.execute("SELECT pg_notify($1, $2)", self._check_channel, token)
                while (await self._echo.get()) != token:
                    pass
        except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("task events self-check failed: %s", type(exc).__name__)
            return False
        return True

    async def run(self) -> None:
        """Hold the connection for ever, replacing it whenever it is lost."""
        first = True
        while not self._stopping:
            conn = await self._connect()
            self._lost.clear()
            if not first:
                log.info("task events connection re-established")
            first = False
            self.connected = True
            # Whatever was sent while there was no connection is lost: everyone re-reads.
            self._resync_all()
            try:
                while not self._lost.is_set():
                    try:
                        async with asyncio.timeout(self._check_interval):
                            await self._lost.wait()
                    except TimeoutError:
                        pass
                    if self._lost.is_set() or not await self._alive(conn):
                        break
            finally:
                self.connected = False
                if self._stopping:
                    # A goodbye the server understands, rather than a cut connection.
                    with contextlib.suppress(*TRANSIENT_DB_ERRORS, asyncpg.PostgresError):
                        await conn.close(timeout=1)
                conn.terminate()
            if self._stopping:
                return
            self.reconnects += 1
            log.warning("task events connection lost; reconnecting")

    def start(self) -> None:
        self._runner = asyncio.create_task(self.run(), name="task-events")
        self._runner.add_done_callback(self._runner_ended)

    @staticmethod
    def _runner_ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # It retries every connection error for ever; anything else is a bug, and a
            # process whose waiters can no longer be woken must not look healthy.
            log.critical("task events listener died", exc_info=task.exception())
            os._exit(70)

    async def close(self) -> None:
        self._stopping = True
        self._lost.set()
        if self._runner is not None:
            # Connected, it ends by itself at once; still connecting (Postgres away, or
            # the process stopping as soon as it started), it is cancelled.
            done: set[asyncio.Task[None]] = set()
            if self.connected:
                done, _ = await asyncio.wait({self._runner}, timeout=2)
            if not done:
                self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._resync_all()
