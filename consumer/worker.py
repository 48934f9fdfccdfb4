"""The consumer's state machine: receive, claim in groups, run, complete in groups, ack.

Messages that arrive close together are claimed with one UPDATE, and outcomes that
finish close together are committed with one statement; only after that commit are
their messages acked. A crash anywhere before the ack redelivers the message, and the
claim then finds the task DONE (or owned by someone live) and drops the duplicate.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from pamqp.commands import Basic

from broker import messages, pipeline
from consumer.attempt import ClaimedTask, StopReason, run_attempt
from consumer.metrics import ConsumerMetrics
from consumer.settings import ConsumerSettings
from db import execution
from db.errors import TRANSIENT_DB_ERRORS
from db.execution import Outcome
from db.outbox import notify
from db.states import TERMINAL, TaskStatus
from runtime import failpoints, tracing
from runtime.backoff import backoff_delay
from runtime.lifecycle import being_cancelled, wait_first
from runtime.logs import bind_task, task_fields
from tasktypes import TaskRegistry

log = logging.getLogger(__name__)


CLAIM_BATCH_MAX = 500

T = TypeVar("T")


@dataclass(slots=True)
class Running:
    claimed: ClaimedTask
    message: AbstractIncomingMessage
    task: asyncio.Task[None] | None = None
    finished: bool = False  # the handler is done; its outcome awaits the commit

    def stop(self, reason: StopReason) -> None:
        if self.claimed.stop_reason is None and self.task is not None:
            self.claimed.stop_reason = reason
            self.task.cancel()


# A message or consumer on a channel that closed under it: aiormq raises
# ChannelInvalidStateError (a RuntimeError, not an AMQPError) for a closed channel,
# and a write can meet a transport reset before the channel knows it is closed.
CHANNEL_GONE: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.MessageProcessError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)
_CANCEL_TIMEOUT = 5.0  # seconds for basic.cancel-ok before shutting down without it
_CANCEL_FAILED: tuple[type[BaseException], ...] = (*CHANNEL_GONE, TimeoutError)


def _frame(how: str, tag: int) -> Basic.Ack | Basic.Nack | Basic.Reject:
    if how == "ack":
        return Basic.Ack(delivery_tag=tag)
    if how == "requeue":
        return Basic.Nack(delivery_tag=tag, requeue=True)
    return Basic.Reject(delivery_tag=tag, requeue=False)  # dead-letter


async def _settle(message: AbstractIncomingMessage, how: str) -> None:
    """Ack, requeue or dead-letter one message; see ``_settle_all``."""
    await _settle_all([(message, how)])


async def _settle_all(settlements: list[tuple[AbstractIncomingMessage, str]]) -> None:
    """Ack, requeue (``"requeue"``) or dead-letter (``"dead-letter"``) messages with one
    write per channel.

    aio-pika's ``ack()`` is a write and a drain of its own, awaited in turn, message by
    message; a committed batch of completions sends its frames together instead. A
    message whose channel closed (or is closing) is skipped: the channel took it back
    and the broker redelivers it. This does not mark the aio-pika message processed, as
    its ``ack()`` would; nothing reads that mark, and every message is settled once.
    """
    frames: dict[
        int, tuple[aiormq.abc.AbstractChannel, list[Basic.Ack | Basic.Nack | Basic.Reject]]
    ] = {}
    for message, how in settlements:
        try:
            channel = message.channel
        except CHANNEL_GONE as exc:
            log.info("could not %s message (channel gone; it will be redelivered): %s", how, exc)
            continue
        tag = message.delivery_tag
        assert tag is not None  # consumed with acks, so every delivery has its tag
        frames.setdefault(id(channel), (channel, []))[1].append(_frame(how, tag))
    for channel, batch in frames.values():
        try:
            await pipeline.send_frames(channel, batch)
        except CHANNEL_GONE as exc:
            log.info(
                "could not settle %d messages (channel gone; it will be redelivered): %s",
                len(batch),
                exc,
            )
        except asyncio.CancelledError as exc:
            if being_cancelled():
                raise
            # aiormq rejects the pending writes of a connection it closes by force so.
            log.info(
                "could not settle %d messages (connection closed; it will be redelivered): %r",
                len(batch),
                exc,
            )


def _trace(message: AbstractIncomingMessage) -> tracing.TraceParent | None:
    """The message's W3C trace context; None when absent or malformed."""
    value = (message.headers or {}).get(tracing.HEADER)
    return tracing.parse(value) if isinstance(value, str | bytes) else None


def _message_fields(
    message: AbstractIncomingMessage, parsed: messages.TaskMessage
) -> dict[str, object]:
    trace = _trace(message)
    return task_fields(
        task_id=str(parsed.task_id),
        outbox_id=parsed.outbox_id,
        trace_id=trace.trace_id if trace is not None else None,
    )


class TaskConsumer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        registry: TaskRegistry,
        settings: ConsumerSettings,
        worker_id: str,
        metrics: ConsumerMetrics | None = None,
    ) -> None:
        self._pool = pool
        self.metrics = metrics if metrics is not None else ConsumerMetrics()
        # time.monotonic() of each loop's last sign of life, for /healthz
        self.alive_at = {"claim": time.monotonic(), "heartbeat": time.monotonic()}
        self._registry = registry
        self._settings = settings
        self.worker_id = worker_id
        self._retry_delay = functools.partial(
            backoff_delay, base=settings.retry_base_delay, cap=settings.retry_max_delay
        )
        self._inbox: deque[tuple[AbstractIncomingMessage, messages.TaskMessage]] = deque()
        self._work = asyncio.Event()  # the inbox got a message or a slot came free
        self._outcomes: list[tuple[Outcome, Running]] = []
        self._outcome_ready = asyncio.Event()
        self._completing = False
        self._settled = asyncio.Event()  # a completion batch was committed and settled
        self._running: dict[uuid.UUID, Running] = {}
        # Deliveries for tasks whose outcome is not committed yet: claimed once it is.
        self._held: list[tuple[AbstractIncomingMessage, messages.TaskMessage]] = []
        self.completed = 0

    @property
    def running_count(self) -> int:
        return len(self._running)

    # -- receiving ------------------------------------------------------------------

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            parsed = messages.parse(message.body)
        except messages.MalformedMessage as exc:
            log.error("dead-lettering a message that is not a task: %s", exc)
            self.metrics.dead_lettered.labels("malformed").inc()
            await _settle(message, "dead-letter")
            return
        self._inbox.append((message, parsed))
        self._work.set()

    # -- claiming -------------------------------------------------------------------

    async def _with_db_retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        failures = 0
        while True:
            try:
                return await call()
            except TRANSIENT_DB_ERRORS as exc:
                self.alive_at[what] = time.monotonic()  # waiting out an outage is not a stall
                failures += 1
                delay = backoff_delay(failures, 0.2, 5.0)
                log.warning(
                    "%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay
                )
                await asyncio.sleep(delay)

    def _take_batch(
        self,
    ) -> tuple[
        list[tuple[AbstractIncomingMessage, messages.TaskMessage]], list[AbstractIncomingMessage]
    ]:
        """Up to the free slots' worth of distinct tasks, and the duplicate deliveries to ack."""
        duplicates: list[AbstractIncomingMessage] = []
        room = min(self._settings.consumer_concurrency - len(self._running), CLAIM_BATCH_MAX)
        batch: dict[uuid.UUID, tuple[AbstractIncomingMessage, messages.TaskMessage]] = {}
        while self._inbox and len(batch) < room:
            message, parsed = self._inbox.popleft()
            running = self._running.get(parsed.task_id)
            if running is not None and running.finished:
                # Its outcome is about to be committed, and may be a retry whose message
                # this is: it must go through the claim, once the commit is done.
                self._held.append((message, parsed))
            elif running is not None:
                # A second delivery of a task we run: keep the newest message (the old one
                # may belong to a channel that reconnected) and settle the other.
                running.message, message = message, running.message
                duplicates.append(message)
            elif parsed.task_id in batch:
                duplicates.append(message)
            else:
                batch[parsed.task_id] = (message, parsed)
        return list(batch.values()), duplicates

    async def _claim(
        self, batch: list[tuple[AbstractIncomingMessage, messages.TaskMessage]]
    ) -> None:
        ids = [parsed.task_id for _, parsed in batch]
        rows = await self._with_db_retry(
            "claim",
            functools.partial(
                execution.claim_tasks,
                self._pool,
                ids,
                self.worker_id,
                self._settings.task_stale_after,
            ),
        )
        by_id = {row["id"]: row for row in rows}
        for message, parsed in batch:
            row = by_id[parsed.task_id]
            if row["claimed"]:
                self._start(row, message, parsed.outbox_id)
            elif row["seen_status"] is None:
                log.error(
                    "dead-lettering a message for a task that does not exist",
                    extra=_message_fields(message, parsed),
                )
                self.metrics.dead_lettered.labels("no_such_task").inc()
                await _settle(message, "dead-letter")
            else:
                log.debug(
                    "dropping duplicate delivery; task is %s",
                    row["seen_status"],
                    extra=_message_fields(message, parsed),
                )
                self.metrics.duplicates.inc()
                await _settle(message, "ack")

    def _start(self, row: asyncpg.Record, message: AbstractIncomingMessage, outbox_id: int) -> None:
        claimed = ClaimedTask(
            row["id"],
            row["type"],
            row["payload"],
            row["attempts"],
            row["max_attempts"],
            outbox_id=outbox_id,
            trace=_trace(message),
            created_at=row["created_at"],
        )
        running = Running(claimed, message)
        running.task = asyncio.create_task(self._execute(running))
        self._running[claimed.task_id] = running

    async def _execute(self, running: Running) -> None:
        # This coroutine is its own asyncio task: whatever it (and the handler) logs
        # carries the task id, outbox id, attempt and trace id.
        bind_task(**running.claimed.log_fields())
        started = time.perf_counter()
        outcome = await run_attempt(
            running.claimed, self._registry, self._settings.handler_timeout, self._retry_delay
        )
        self.metrics.handler_seconds.labels(running.claimed.type).observe(
            time.perf_counter() - started
        )
        running.finished = True
        self._outcomes.append((outcome, running))
        self._outcome_ready.set()

    async def claim_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.alive_at["claim"] = time.monotonic()
            await wait_first(self._work, stop, within=1.0)
            self._work.clear()
            while self._inbox and not stop.is_set():
                batch, duplicates = self._take_batch()
                for message in duplicates:
                    await _settle(message, "ack")
                if not batch:
                    if duplicates:
                        continue
                    break  # every slot is busy; a finishing task sets _work again
                await self._claim(batch)

    # -- completing -----------------------------------------------------------------

    async def complete_loop(self) -> None:
        """Commit finished attempts in groups, then settle their messages."""
        while True:
            await self._outcome_ready.wait()
            self._outcome_ready.clear()
            batch, self._outcomes = self._outcomes, []
            if not batch:
                continue
            self._completing = True
            try:
                recorded = await self._with_db_retry(
                    "completion",
                    functools.partial(execution.finish_tasks, self._pool, [o for o, _ in batch]),
                )
                failpoints.hit("consumer.after_commit")
                self._count(batch, recorded)
                # Forget the tasks before the first await: a delivery that arrives from
                # here on is a new message (a retry's, say) and must be claimed.
                for _, running in batch:
                    self._running.pop(running.claimed.task_id, None)
                self._inbox.extendleft(reversed(self._held))
                self._held.clear()
                # A released task goes back to the queue; everything else is settled (an
                # outcome that lost its fence means someone else owns the task now).
                await _settle_all(
                    [
                        (
                            running.message,
                            "requeue" if outcome.status == TaskStatus.PENDING else "ack",
                        )
                        for outcome, running in batch
                    ]
                )
                self.completed += len(batch)
                self._work.set()
            finally:
                self._completing = False
                self._settled.set()

    def _count(self, batch: list[tuple[Outcome, Running]], recorded: set[uuid.UUID]) -> None:
        """Metrics and a debug line for the outcomes this commit recorded."""
        now = time.time()
        for outcome, running in batch:
            claimed = running.claimed
            if outcome.task_id not in recorded:
                log.info(
                    "outcome %s not recorded: the task changed owner meanwhile",
                    outcome.status,
                    extra=claimed.log_fields(),
                )
                continue
            self.metrics.outcome(claimed.type, outcome.status)
            if outcome.status in TERMINAL and claimed.created_at is not None:
                self.metrics.end_to_end_seconds.labels(claimed.type).observe(
                    max(0.0, now - claimed.created_at.timestamp())
                )
            if log.isEnabledFor(logging.DEBUG):
                log.debug("attempt committed: %s", outcome.status, extra=claimed.log_fields())

    # -- keeping tasks alive --------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        """Keep running tasks' heartbeats fresh and notice cancellation requests."""
        while True:
            self.alive_at["heartbeat"] = time.monotonic()
            await asyncio.sleep(self._settings.heartbeat_interval)
            if not self._running:
                continue
            try:
                owned = await execution.heartbeat(self._pool, list(self._running), self.worker_id)
            except TRANSIENT_DB_ERRORS as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            for task_id, cancel_requested in owned.items():
                running = self._running.get(task_id)
                if cancel_requested and running is not None:
                    log.info("cancelling on request", extra=running.claimed.log_fields())
                    running.stop("cancel")

    async def rescue_loop(self) -> None:
        """Requeue (or fail) tasks whose consumer stopped heartbeating."""
        while True:
            await asyncio.sleep(self._settings.rescue_interval)
            try:
                rescued = await execution.rescue_stale(self._pool, self._settings.task_stale_after)
                if any(row["status"] == TaskStatus.NEW for row in rescued):
                    await notify(self._pool, self._settings.outbox_channel)
            except TRANSIENT_DB_ERRORS as exc:
                log.warning("stuck-task rescue failed: %s", exc)
                continue
            for row in rescued:
                self.metrics.rescued.labels(row["status"]).inc()
                log.warning(
                    "rescued a task whose consumer stopped heartbeating -> %s",
                    row["status"],
                    extra=task_fields(task_id=str(row["id"]), attempt=row["attempts"]),
                )

    # -- the whole life ---------------------------------------------------------------

    async def run(self, queue: AbstractQueue, stop: asyncio.Event) -> None:
        tag = await queue.consume(self.on_message)
        log.info("consuming from %s as %s", queue.name, self.worker_id)
        try:
            await self.claim_loop(stop)
        finally:
            await self._shut_down(queue, tag)

    async def _shut_down(self, queue: AbstractQueue, tag: str) -> None:
        # The connection may be down (and reconnecting) right now: a robust queue's
        # cancel then waits for the channel to come back, for as long as that takes, or
        # meets the closed channel. The robust queue forgets the tag first (it is not
        # restored later) and a dead channel took its deliveries back with it, so
        # stopping goes on either way.
        try:
            async with asyncio.timeout(_CANCEL_TIMEOUT):
                await queue.cancel(tag)
        except _CANCEL_FAILED as exc:
            log.info("could not cancel the AMQP consumer (channel gone?): %r", exc)
        self._inbox.extend(self._held)
        self._held.clear()
        await _settle_all([(message, "requeue") for message, _ in self._inbox])
        self._inbox.clear()
        handlers = [r.task for r in self._running.values() if r.task is not None]
        if handlers:
            log.info(
                "waiting up to %.0fs for %d running tasks",
                self._settings.shutdown_grace,
                len(handlers),
            )
            _, unfinished = await asyncio.wait(handlers, timeout=self._settings.shutdown_grace)
            for running in list(self._running.values()):
                if running.task in unfinished:
                    running.stop("shutdown")
            await asyncio.gather(*unfinished, return_exceptions=True)
        while self._outcomes or self._completing or self._running:
            self._settled.clear()
            await self._settled.wait()
