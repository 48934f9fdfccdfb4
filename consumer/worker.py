"""The consumer's loops: receive, claim in groups, run, complete in groups, settle.

Messages that arrive close together are claimed with one UPDATE, and outcomes that
finish close together are committed with one statement; only after that commit are
their messages acked. A crash anywhere before the ack redelivers the message, and the
claim then finds the task DONE (or owned by someone live) and drops the duplicate.

What happens to each task this consumer holds is decided by ``consumer.lifecycle``
(one phase per task, its transitions in one place); this module carries those
decisions out against Postgres, RabbitMQ and the handlers' asyncio tasks.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from opentelemetry import trace
from pamqp.commands import Basic

from taskbox.broker import messages, pipeline
from taskbox.consumer.attempt import (
    AttemptTimedOut,
    ClaimedTask,
    error_of,
    failed_outcome,
    run_attempt,
    stopped_outcome,
    type_retry_delay,
)
from taskbox.consumer.attempt_spans import end_attempt_span, start_attempt_span
from taskbox.consumer.lifecycle import Execution, Executions, StopReason
from taskbox.consumer.metrics import ConsumerMetrics
from taskbox.consumer.settings import ConsumerSettings
from taskbox.db import execution as task_execution
from taskbox.db.errors import TRANSIENT_DB_ERRORS, nothing_committed
from taskbox.db.execution import Delivery, Outcome
from taskbox.db.outbox import notify
from taskbox.db.states import TERMINAL, TaskStatus
from taskbox.runtime import failpoints, tracing
from taskbox.runtime.backoff import backoff_delay
from taskbox.runtime.lifecycle import being_cancelled, wait_first
from taskbox.runtime.logs import bind_task, task_fields
from taskbox.runtime.queues import DEFAULT_QUEUE, amqp_queue_name
from taskbox.tasktypes import TaskRegistry

log = logging.getLogger(__name__)

# A delivery: the AMQP message and what it says (task id, outbox row id).
Inbound = tuple[AbstractIncomingMessage, messages.TaskMessage]

CLAIM_BATCH_MAX = 500

T = TypeVar("T")


@dataclass(slots=True)
class Handler:
    """The asyncio side of an execution: its handler's task and its grace timer."""

    claimed: ClaimedTask
    retry_delay: Callable[[int], float]  # the task type's backoff
    task: asyncio.Task[None] | None = None
    watchdog: asyncio.TimerHandle | None = None

    def disarm(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None


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


async def consume(queue: AbstractQueue, callback: Callable[[AbstractIncomingMessage], Any]) -> str:
    """``queue.consume(callback)``, tried again while the connection is down. A robust
    queue restores a consumer it has registered after each reconnect, but one whose
    basic.consume met a cut was never registered: without this, a process that starts
    during a cut would lose its loop and exit."""
    failures = 0
    while True:
        try:
            tag: str = await queue.consume(callback)
            return tag
        except CHANNEL_GONE as exc:
            failures += 1
            delay = backoff_delay(failures, 0.2, 5.0)
            log.warning("consuming from %s failed (%r); retrying in %.1fs", queue.name, exc, delay)
            await asyncio.sleep(delay)


def _frame(how: str, tag: int) -> Basic.Ack | Basic.Nack | Basic.Reject:
    if how == "ack":
        return Basic.Ack(delivery_tag=tag)
    if how == "requeue":
        return Basic.Nack(delivery_tag=tag, requeue=True)
    return Basic.Reject(delivery_tag=tag, requeue=False)  # dead-letter


async def _settle(message: AbstractIncomingMessage, how: str, *, pipelined: bool = True) -> None:
    """Ack, requeue or dead-letter one message; see ``_settle_all``."""
    await _settle_all([(message, how)], pipelined=pipelined)


async def _settle_each(settlements: list[tuple[AbstractIncomingMessage, str]]) -> None:
    """``_settle_all`` through aio-pika's public API (AMQP_PIPELINE=false): one
    ``ack()``, ``nack()`` or ``reject()`` after the other, each its own write."""
    for message, how in settlements:
        try:
            if how == "ack":
                await message.ack()
            elif how == "requeue":
                await message.nack(requeue=True)
            else:
                await message.reject(requeue=False)
        except CHANNEL_GONE as exc:
            log.info("could not %s message (channel gone; it will be redelivered): %s", how, exc)
        except asyncio.CancelledError as exc:
            if being_cancelled():
                raise
            log.info("could not %s message (connection closed; redelivered): %r", how, exc)


async def _settle_all(
    settlements: list[tuple[AbstractIncomingMessage, str]], *, pipelined: bool = True
) -> None:
    """Ack, requeue (``"requeue"``) or dead-letter (``"dead-letter"``) messages with one
    write per channel.

    aio-pika's ``ack()`` is a write and a drain of its own, awaited in turn, message by
    message; a committed batch of completions sends its frames together instead. A
    message whose channel closed (or is closing) is skipped: the channel took it back
    and the broker redelivers it. This does not mark the aio-pika message processed, as
    its ``ack()`` would; nothing reads that mark, and every message is settled once.
    Not ``pipelined`` (AMQP_PIPELINE=false): aio-pika's own calls, ``_settle_each``.
    """
    if not pipelined:
        await _settle_each(settlements)
        return
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


# SQLSTATE classes of a statement refused for the values it carries: data exceptions
# (22: a NUL in text, a number out of range), integrity constraints (23) and program
# limits (54: a jsonb too large). Any other refusal (read-only after a failover, a
# revoked grant) says nothing about one outcome, and would fail good ones.
_VALUE_REFUSALS = ("22", "23", "54")


def _refused_for_its_values(exc: BaseException) -> bool:
    """Whether a failed outcome write proves that its values (not the database) are at
    fault, and that nothing was committed: the JSON encoder refused a value before
    sending (TypeError, ValueError), or Postgres refused the statement for its data."""
    if isinstance(exc, TypeError | ValueError) and not isinstance(exc, asyncpg.PostgresError):
        return True
    if not nothing_committed(exc):
        return False
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return sqlstate[:2] in _VALUE_REFUSALS


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
        tracer: trace.Tracer | None = None,
        *,
        concurrency: int | None = None,
        threads: ThreadPoolExecutor | None = None,
        queue: str = DEFAULT_QUEUE,
    ) -> None:
        """One pool of handlers fed by one AMQP queue. A consumer process serving several
        queues runs one per queue (``concurrency`` each, CONSUMER_CONCURRENCY when None),
        each with its own worker id: to the protocol they are separate consumers that
        share a database pool and the handler ``threads`` (owned by the caller when
        given)."""
        self._pool = pool
        self._tracer = tracer  # None: tracing is off
        self.metrics = metrics if metrics is not None else ConsumerMetrics()
        # time.monotonic() of each loop's last sign of life, for /healthz
        self.alive_at = {"claim": time.monotonic(), "heartbeat": time.monotonic()}
        self._registry = registry
        self._settings = settings
        self._pipelined = settings.amqp_pipeline  # acks in batches (broker.pipeline)
        self.worker_id = worker_id
        self.queue = queue  # the Taskbox queue it serves
        self._concurrency = (
            concurrency if concurrency is not None else settings.consumer_concurrency
        )
        # Plain ``def`` handlers run here. A thread past its timeout or stop cannot be
        # killed: it keeps its slot until the handler returns (README, Guarantees).
        self._owns_threads = threads is None
        self._threads = threads or ThreadPoolExecutor(
            max_workers=settings.handler_threads, thread_name_prefix="handler"
        )
        self._inbox: deque[Inbound] = deque()
        self._work = asyncio.Event()  # the inbox got a message or a slot came free
        self._executions: Executions[Inbound] = Executions()
        self._handlers: dict[Execution[Inbound], Handler] = {}
        self._outcomes: list[tuple[Outcome, Execution[Inbound], ClaimedTask]] = []
        self._outcome_ready = asyncio.Event()
        self._completing = False
        self._settled = asyncio.Event()  # a completion batch was committed and settled
        self.completed = 0
        # The AMQP queue and the tag of the consumer on it: None while the Taskbox queue
        # is paused (set_paused), before run() and after the stop.
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._paused = False
        self._stopping = False
        self._consuming = asyncio.Lock()  # registering or cancelling the AMQP consumer
        self._cancelled_tags: set[str] = set()  # stray consumers cancelled while paused

    @property
    def running_count(self) -> int:
        return self._executions.busy_slots

    # -- receiving ------------------------------------------------------------------

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        if self._paused:
            await self._refuse_while_paused(message)
            return
        try:
            parsed = messages.parse(message.body)
        except messages.MalformedMessage as exc:
            log.error("dead-lettering a message that is not a task: %s", exc)
            self.metrics.dead_lettered.labels("malformed").inc()
            await _settle(message, "dead-letter", pipelined=self._pipelined)
            return
        self._inbox.append((message, parsed))
        self._work.set()

    def _claim_again(self, deliveries: list[Inbound]) -> None:
        """Deliveries whose fate only the claim can decide, ahead of the newer ones."""
        if deliveries:
            self._inbox.extendleft(reversed(deliveries))
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

    def _take_batch(self) -> list[Inbound]:
        """Up to the free slots' worth of deliveries of distinct tasks to claim.

        A delivery of a task running here is held by its execution (never acked on the
        spot: only the database can prove it redundant). A second delivery of a task
        already in this batch waits for the next one, when the first's claim is known.
        """
        room = min(self._concurrency - self._executions.busy_slots, CLAIM_BATCH_MAX)
        batch: dict[uuid.UUID, Inbound] = {}
        later: list[Inbound] = []
        while self._inbox and len(batch) < room:
            delivery = self._inbox.popleft()
            task_id = delivery[1].task_id
            if self._executions.receive(task_id, delivery):
                continue
            if task_id in batch:
                later.append(delivery)
            else:
                batch[task_id] = delivery
        self._inbox.extendleft(reversed(later))
        return list(batch.values())

    async def _claim(self, batch: list[Inbound]) -> None:
        deliveries = [Delivery(parsed.task_id, parsed.outbox_id) for _, parsed in batch]
        rows = await self._with_db_retry(
            "claim",
            functools.partial(
                task_execution.claim_tasks,
                self._pool,
                deliveries,
                self.worker_id,
                self._settings.task_stale_after,
            ),
        )
        by_id = {row["id"]: row for row in rows}
        settle: list[tuple[AbstractIncomingMessage, str]] = []
        dropped: list[tuple[Inbound, str]] = []
        for delivery in batch:
            message, parsed = delivery
            row = by_id[parsed.task_id]
            if row["claimed"]:
                self._start(row, delivery)
            elif row["seen_status"] is None:
                log.error(
                    "dead-lettering a message for a task that does not exist",
                    extra=_message_fields(message, parsed),
                )
                self.metrics.dead_lettered.labels("no_such_task").inc()
                settle.append((message, "dead-letter"))
            else:
                # The database's proof: the task is finished, running under another
                # live consumer, or waiting for a newer outbox row than this message's.
                self.metrics.duplicates.inc()
                settle.append((message, "ack"))
                dropped.append((delivery, row["seen_status"]))
        if settle:
            await _settle_all(settle, pipelined=self._pipelined)
        # Logged once the acks are written: a reader of the log (a test, an operator
        # stopping the consumer) sees the line only when the broker has the ack coming.
        for (message, parsed), status in dropped:
            log.debug(
                "dropping duplicate delivery; task is %s",
                status,
                extra=_message_fields(message, parsed),
            )

    def _start(self, row: asyncpg.Record, delivery: Inbound) -> None:
        message, parsed = delivery
        claimed = ClaimedTask(
            row["id"],
            row["type"],
            row["payload"],
            row["attempts"],
            row["max_attempts"],
            lease=row["lease"],
            outbox_id=parsed.outbox_id,
            trace=_trace(message),
            created_at=row["created_at"],
        )
        if self._tracer is not None:
            claimed.span = start_attempt_span(
                self._tracer, claimed, amqp_queue_name(self._settings.queue_name, self.queue)
            )
        execution = self._executions.start(claimed.task_id, claimed.lease, delivery)
        task_type = self._registry.get(claimed.type)
        retry_delay = type_retry_delay(
            task_type, base=self._settings.retry_base_delay, cap=self._settings.retry_max_delay
        )
        handler = Handler(claimed, retry_delay)
        self._handlers[execution] = handler
        handler.task = asyncio.create_task(self._execute(execution, handler))
        limit = (task_type.timeout if task_type is not None else None) or (
            self._settings.handler_timeout
        )
        # A handler that swallows its timeout's cancellation would hold the task forever.
        handler.watchdog = asyncio.get_running_loop().call_later(
            limit + self._settings.handler_cancel_grace, self._abandon, execution, "timeout"
        )

    async def _execute(self, execution: Execution[Inbound], handler: Handler) -> None:
        # This coroutine is its own asyncio task: whatever it (and the handler) logs
        # carries the task id, outbox id, attempt and trace id.
        claimed = handler.claimed
        bind_task(**claimed.log_fields())
        started = time.perf_counter()
        attempt = run_attempt(
            claimed,
            self._registry,
            self._settings.handler_timeout,
            handler.retry_delay,
            lambda: execution.stop_reason,
            self._settings.max_result_bytes,
            self._threads,
        )
        if claimed.span is None:
            outcome = await attempt
        else:
            # The handler runs in the attempt's span: spans it starts are its children.
            # The span ends at the commit (_count), with the outcome recorded.
            with trace.use_span(
                claimed.span,
                end_on_exit=False,
                record_exception=False,
                set_status_on_exception=False,
            ):
                outcome = await attempt
        self.metrics.handler_seconds.labels(claimed.type).observe(time.perf_counter() - started)
        if self._handlers.get(execution) is handler:
            del self._handlers[execution]
            handler.disarm()
        if self._executions.finish(execution, outcome):
            self._queue_outcome(outcome, execution, claimed)
        self._work.set()  # a slot came free

    def _queue_outcome(
        self, outcome: Outcome, execution: Execution[Inbound], claimed: ClaimedTask
    ) -> None:
        self._outcomes.append((outcome, execution, claimed))
        self._outcome_ready.set()

    def _stop(self, execution: Execution[Inbound], reason: StopReason) -> None:
        """Ask a running handler to stop; past the grace its attempt ends without it."""
        if not self._executions.stop(execution, reason):
            return
        handler = self._handlers.get(execution)
        if handler is None or handler.task is None:
            return
        handler.task.cancel()
        handler.disarm()
        handler.watchdog = asyncio.get_running_loop().call_later(
            self._settings.handler_cancel_grace, self._abandon, execution, reason
        )

    def _abandon(self, execution: Execution[Inbound], why: StopReason | str) -> None:
        """The grace ran out: write the attempt's outcome for its handler, which keeps
        running detached (Python cannot stop a coroutine that refuses to end)."""
        handler = self._handlers.pop(execution, None)
        if handler is None:
            return
        handler.watchdog = None
        claimed = handler.claimed
        if why == "timeout":
            if handler.task is not None:
                handler.task.cancel()  # once more: the handler may yet listen
            outcome = failed_outcome(
                claimed,
                AttemptTimedOut(
                    "the handler ignored its timeout and was abandoned after "
                    f"{self._settings.handler_cancel_grace:g}s more"
                ),
                handler.retry_delay,
            )
        else:
            outcome = stopped_outcome(claimed, execution.stop_reason or "shutdown")
        if self._executions.abandon(execution, outcome):
            log.warning(
                "abandoning a handler that ignored its %s; it keeps running detached and "
                "its result will be dropped",
                "timeout" if why == "timeout" else "stop",
                extra=claimed.log_fields(),
            )
            self.metrics.abandoned.labels(why).inc()
            self._queue_outcome(outcome, execution, claimed)
            self._work.set()

    def _lose(self, task_id: uuid.UUID, lease: int) -> None:
        """The heartbeat found the task no longer ours (rescued while this consumer
        stalled or was cut off): stop the run, write nothing, claim its messages again."""
        execution = self._executions.lose(task_id, lease)
        if execution is None:
            return
        handler = self._handlers.pop(execution, None)
        if handler is not None:
            handler.disarm()
            if handler.task is not None:
                handler.task.cancel()
            log.warning(
                "stopping an attempt whose task is no longer ours (rescued meanwhile)",
                extra=handler.claimed.log_fields(),
            )
            if handler.claimed.span is not None:
                end_attempt_span(handler.claimed.span, None, None)
        self.metrics.ownership_lost.inc()
        self._claim_again(Executions.claim_again_after_loss(execution))
        self._settled.set()  # one execution fewer: a shutdown waiting on them looks again

    async def claim_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.alive_at["claim"] = time.monotonic()
            await wait_first(self._work, stop, within=1.0)
            self._work.clear()
            while self._inbox and not stop.is_set():
                batch = self._take_batch()
                if not batch:
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
                recorded = await self._write_outcomes([o for o, _, _ in batch])
                failpoints.hit("consumer.after_commit")
                self._count(batch, recorded)
                # Settle the executions before the first await: a delivery that arrives
                # from here on is a new message (a retry's, say) and must be claimed.
                settle: list[tuple[AbstractIncomingMessage, str]] = []
                again: list[Inbound] = []
                for outcome, execution, _ in batch:
                    settled = self._executions.committed(execution, recorded.get(outcome.task_id))
                    settle.extend((message, how) for (message, _), how in settled.settle)
                    again.extend(settled.claim_again)
                self._claim_again(again)
                await _settle_all(settle, pipelined=self._pipelined)
                self.completed += len(batch)
                self._work.set()
            finally:
                self._completing = False
                self._settled.set()

    async def _write_outcomes(self, outcomes: list[Outcome]) -> dict[uuid.UUID, str]:
        """Commit the outcomes in one statement. One Postgres refuses (a value it cannot
        store that got past the checks) must not take its batch-mates with it: a failure
        that proves nothing was committed is split, outcome by outcome, and an outcome
        refused alone is written as FAILED with the reason instead."""
        try:
            return await self._with_db_retry(
                "completion",
                functools.partial(
                    task_execution.finish_tasks, self._pool, outcomes, self.worker_id
                ),
            )
        except (TypeError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not _refused_for_its_values(exc):
                raise  # the database itself is unwell: the completer dies, exit 3
            refusal = exc
        if len(outcomes) > 1:
            recorded: dict[uuid.UUID, str] = {}
            for outcome in outcomes:
                recorded |= await self._write_outcomes([outcome])
            return recorded
        [outcome] = outcomes
        log.error(
            "Postgres refused to store an outcome %s; the task is failed instead: %r",
            outcome.status,
            refusal,
            extra=task_fields(task_id=str(outcome.task_id), attempt=outcome.attempt),
        )
        self.metrics.unstorable.inc()
        error = error_of(refusal)
        substitute = Outcome(
            outcome.task_id,
            outcome.attempt,
            TaskStatus.FAILED,
            error={
                "type": "UnstorableOutcome",
                "message": f"the attempt's {outcome.status} outcome could not be stored: "
                f"{error['type']}: {error['message']}",
            },
            lease=outcome.lease,
        )
        return await self._with_db_retry(
            "completion",
            functools.partial(
                task_execution.finish_tasks, self._pool, [substitute], self.worker_id
            ),
        )

    def _count(
        self,
        batch: list[tuple[Outcome, Execution[Inbound], ClaimedTask]],
        recorded: dict[uuid.UUID, str],
    ) -> None:
        """Metrics and a debug line for the outcomes this commit recorded."""
        now = time.time()
        for outcome, _, claimed in batch:
            status = recorded.get(outcome.task_id)
            if claimed.span is not None:
                end_attempt_span(claimed.span, outcome, status)
            fields = claimed.log_fields()
            if status is None:
                self.metrics.refused.inc()
                log.info(
                    "outcome %s not recorded: the task changed owner meanwhile; its messages "
                    "go back through the claim",
                    outcome.status,
                    extra=fields,
                )
                continue
            # A release is recorded as NEW, like a retry; the metric tells them apart.
            released = outcome.status == TaskStatus.PENDING and status == TaskStatus.NEW
            self.metrics.outcome(
                claimed.type, TaskStatus.PENDING if released else status, self.queue
            )
            if status in TERMINAL and claimed.created_at is not None:
                self.metrics.end_to_end_seconds.labels(claimed.type).observe(
                    max(0.0, now - claimed.created_at.timestamp())
                )
            if log.isEnabledFor(logging.DEBUG):
                log.debug("attempt committed: %s", status, extra=fields)

    # -- keeping tasks alive --------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        """Keep running tasks' heartbeats fresh, notice cancellation requests, and stop
        the attempts whose task is no longer ours."""
        while True:
            self.alive_at["heartbeat"] = time.monotonic()
            await asyncio.sleep(self._settings.heartbeat_interval)
            leases = self._executions.leases()
            if not leases:
                continue
            # The executions asked about: a lost claim's lease number can come back (a
            # failover to an async standby), so while this heartbeat was out the task may
            # have been claimed again here under the same number. Only the execution the
            # answer is about is stopped.
            asked = {task_id: self._executions.get(task_id) for task_id, _ in leases}
            try:
                owned = await task_execution.heartbeat(self._pool, leases, self.worker_id)
            except TRANSIENT_DB_ERRORS as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            for task_id, lease in leases:
                if task_id not in owned:
                    if self._executions.get(task_id) is asked[task_id]:
                        self._lose(task_id, lease)
                    continue
                execution = self._executions.get(task_id)
                if owned[task_id] and execution is not None and execution.lease == lease:
                    handler = self._handlers.get(execution)
                    if handler is not None and execution.stop_reason is None:
                        log.info("cancelling on request", extra=handler.claimed.log_fields())
                    self._stop(execution, "cancel")

    async def rescue_loop(self) -> None:
        """Requeue (or fail) tasks whose consumer stopped heartbeating."""
        while True:
            await asyncio.sleep(self._settings.rescue_interval)
            try:
                rescued = await task_execution.rescue_stale(
                    self._pool, self._settings.task_stale_after
                )
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
        async with self._consuming:
            self._queue = queue
            if self._paused:
                log.warning("not consuming from %s: its queue is paused", queue.name)
            else:
                self._tag = await consume(queue, self.on_message)
                log.info("consuming from %s as %s", queue.name, self.worker_id)
        try:
            await self.claim_loop(stop)
        finally:
            self._stopping = True
            try:
                await self._shut_down(queue)
            finally:
                # Threads still running a handler (abandoned after its timeout or stop)
                # cannot be stopped; the interpreter waits for them before it exits.
                if self._owns_threads:
                    self._threads.shutdown(wait=False, cancel_futures=True)

    # -- pausing --------------------------------------------------------------------

    async def set_paused(self, paused: bool) -> None:
        """Stop or restart taking messages from the queue (a paused Taskbox queue).

        Pausing cancels the AMQP consumer and hands back the deliveries not yet claimed:
        they wait in RabbitMQ, PENDING, until the resume. Tasks running here finish
        normally. One registration at a time (``_consuming``): a pause and a resume
        racing ``run()``'s start, or each other, never leave a second consumer behind.
        """
        async with self._consuming:
            if paused == self._paused or self._stopping:
                return
            self._paused = paused
            queue = self._queue
            if queue is None:  # not running yet: run() reads _paused
                return
            if paused:
                tag, self._tag = self._tag, None
                if tag is not None:
                    self._cancelled_tags.add(tag)
                    await self._cancel_consumer(queue, tag)
                await self._inbox_back()
                log.warning("queue paused: stopped consuming from %s", queue.name)
                return
            self._tag = await consume(queue, self.on_message)
            log.warning("queue resumed: consuming from %s again", queue.name)

    async def _refuse_while_paused(self, message: AbstractIncomingMessage) -> None:
        """A delivery while paused: one already on its way when the cancel went out, or
        from a consumer the pause could not cancel (a cancel that timed out, or one a
        reconnect restored). It goes back to the queue, and such a consumer is cancelled
        now, so the pause holds."""
        await _settle(message, "requeue", pipelined=self._pipelined)
        tag, queue = message.consumer_tag, self._queue
        if tag is None or tag == self._tag or tag in self._cancelled_tags or queue is None:
            return
        self._cancelled_tags.add(tag)
        log.warning("cancelling a consumer left on paused queue %s (tag %s)", queue.name, tag)
        await self._cancel_consumer(queue, tag)

    async def _cancel_consumer(self, queue: AbstractQueue, tag: str) -> None:
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

    async def _inbox_back(self) -> None:
        """Requeue the deliveries received and not yet claimed."""
        waiting = [(message, "requeue") for message, _ in self._inbox]
        self._inbox.clear()
        if waiting:
            await _settle_all(waiting, pipelined=self._pipelined)

    async def _requeue_waiting(self) -> None:
        """Hand every delivery not running here back to the broker."""
        self._inbox.extend(self._executions.drain_held())
        waiting = [(message, "requeue") for message, _ in self._inbox]
        self._inbox.clear()
        if waiting:
            await _settle_all(waiting, pipelined=self._pipelined)

    async def _shut_down(self, queue: AbstractQueue) -> None:
        if being_cancelled():
            # A background loop died (supervise() cancels us): the completer may be gone,
            # so waiting for outcomes could last for ever. Exit as a crash would: the
            # channel's close returns every unacked message and the rescue takes the
            # rows left PROCESSING.
            log.warning("stopping without finishing %d running tasks", len(self._executions))
            return
        tag, self._tag = self._tag, None
        if tag is not None:
            await self._cancel_consumer(queue, tag)
        await self._requeue_waiting()
        handlers = [h.task for h in self._handlers.values() if h.task is not None]
        if handlers:
            log.info(
                "waiting up to %.0fs for %d running tasks",
                self._settings.shutdown_grace,
                len(handlers),
            )
            await asyncio.wait(handlers, timeout=self._settings.shutdown_grace)
            # The rest are handed back; one that ignores the stop is abandoned after
            # HANDLER_CANCEL_GRACE, so every execution reaches its commit.
            for execution in self._executions:
                self._stop(execution, "shutdown")
        while self._outcomes or self._completing or len(self._executions):
            self._settled.clear()
            await self._settled.wait()
            await self._requeue_waiting()
