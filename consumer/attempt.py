"""One attempt of one task: run its handler under a timeout, call the registry's hooks
around it, and turn the end into an Outcome.

An ``async def`` handler runs on the event loop; a plain ``def`` in the consumer's thread
pool (HANDLER_THREADS), in a copy of the caller's context so its log lines carry the
task's fields. A timeout or a stop ends the attempt, not the thread: Python cannot kill
a thread, so it runs on, holding its pool slot, until the handler returns; what it
returns then is dropped."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import re
import sys
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from opentelemetry.trace import Span
from pydantic import BaseModel, ValidationError

from taskbox.consumer.lifecycle import StopReason
from taskbox.db.execution import Outcome
from taskbox.db.states import TaskStatus
from taskbox.db.storable import UnstorablePayload, check_storable
from taskbox.runtime import tracing
from taskbox.runtime.backoff import DEFAULT_JITTER, backoff_delay
from taskbox.runtime.logs import task_fields
from taskbox.tasktypes import (
    AttemptEvent,
    HookEvent,
    PermanentError,
    Retry,
    TaskContext,
    TaskRegistry,
    TaskType,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_RESULT_BYTES = 1_048_576  # the default of MAX_RESULT_BYTES

# What jsonb cannot hold in a text: replaced in error messages, which are ours to word.
_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")
# A NUL in the encoded JSON: the escape \u0000 after an even number of backslashes (an
# odd number means the backslash itself was escaped, in text that reads "\u0000").
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


class UnknownTaskType(Exception):
    """This consumer has no handler for the task's type (a TASK_MODULES mismatch)."""


class UnserializableResult(PermanentError):
    pass


class AttemptTimedOut(Exception):
    """The handler ran past its timeout; retried like any other failure."""


class HandlerCancelled(Exception):
    """A CancelledError the consumer did not ask for ended the handler (a library
    cancelled a task the handler awaited, say): an ordinary failed attempt."""


def _never_stopped() -> StopReason | None:
    return None


@dataclass(slots=True)
class ClaimedTask:
    task_id: Any
    type: str
    payload: Any
    attempt: int
    max_attempts: int
    lease: int = 0  # the fencing token of this claim (db.execution)
    outbox_id: int | None = None  # the outbox row whose message brought the task
    trace: tracing.TraceParent | None = None  # W3C trace context from the message headers
    created_at: datetime | None = None  # for the end-to-end latency
    span: Span | None = None  # the attempt's span (consumer.attempt_spans); None: tracing off

    @property
    def traceparent(self) -> str | None:
        return str(self.trace) if self.trace is not None else None

    def log_fields(self) -> dict[str, Any]:
        """What every log line about this attempt carries."""
        return task_fields(
            task_id=str(self.task_id),
            outbox_id=self.outbox_id,
            attempt=self.attempt,
            trace_id=self.trace.trace_id if self.trace is not None else None,
        )


def storable_text(text: str) -> str:
    """``text`` with what Postgres cannot store (NUL, lone surrogates) replaced."""
    return _UNSTORABLE_TEXT.sub("\ufffd", text)


def error_of(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": storable_text(str(exc)[:2000])}


def _json_result(result: Any, max_bytes: int) -> orjson.Fragment:
    """The result as stored JSON. What jsonb or the encoder would refuse (a NUL
    character, a lone surrogate, an integer past 64 bits) fails this attempt alone,
    instead of the completion batch it joins; so does a result over ``max_bytes``,
    which would make every completion commit that carries it slow, or time out and be
    retried for ever."""
    try:
        if isinstance(result, BaseModel):
            result = result.model_dump(mode="json", by_alias=True)
        document = orjson.dumps(result)
    except (TypeError, ValueError) as exc:  # pydantic's serialization error is a ValueError
        raise UnserializableResult(
            f"the handler's result is not JSON: {storable_text(str(exc))}"
        ) from None
    if len(document) > max_bytes:
        raise UnserializableResult(
            f"the handler's result is {len(document)} bytes of JSON, more than "
            f"MAX_RESULT_BYTES ({max_bytes})"
        )
    if _NUL_ESCAPE.search(document):
        # Rare: read it back only to say where the NUL is.
        try:
            check_storable(orjson.loads(document), max_string=sys.maxsize)
        except UnstorablePayload as exc:
            where = "".join(f"[{part!r}]" for part in exc.loc) or "itself"
            raise UnserializableResult(
                f"the handler's result cannot be stored: at {storable_text(where)}: {exc.msg}"
            ) from None
    return orjson.Fragment(document)


def stopped_outcome(claimed: ClaimedTask, reason: StopReason) -> Outcome:
    """How an attempt the consumer stopped ends: CANCELLED on request, handed back
    at shutdown (outcome PENDING: the task goes out again through a new outbox row,
    its attempt given back). A lost attempt's outcome is never
    written (the fence would refuse it anyway); PENDING stands in for it."""
    if reason == "cancel":
        return Outcome(
            claimed.task_id,
            claimed.attempt,
            TaskStatus.CANCELLED,
            error={"type": "Cancelled", "message": "cancelled on request while running"},
            lease=claimed.lease,
        )
    return Outcome(claimed.task_id, claimed.attempt, TaskStatus.PENDING, lease=claimed.lease)


def failed_outcome(
    claimed: ClaimedTask, exc: Exception, retry_delay: Callable[[int], float]
) -> Outcome:
    """A failed attempt: retried (NEW after a backoff) while attempts remain, else FAILED;
    a PermanentError fails at once."""
    task_id, attempt = claimed.task_id, claimed.attempt
    error = error_of(exc)
    if isinstance(exc, PermanentError):
        return Outcome(task_id, attempt, TaskStatus.FAILED, error=error, lease=claimed.lease)
    if isinstance(exc, AttemptTimedOut):
        error["type"] = "HandlerTimeout"
    if attempt < claimed.max_attempts:
        if isinstance(exc, Retry) and exc.in_seconds is not None:
            delay = exc.in_seconds
        else:
            delay = retry_delay(attempt)
        log.info(
            "attempt failed, retrying in %.1fs: %s",
            delay,
            error["message"],
            extra=claimed.log_fields(),
        )
        return Outcome(
            task_id,
            attempt,
            TaskStatus.NEW,
            error=error,
            retry_in=delay,
            traceparent=claimed.traceparent,
            lease=claimed.lease,
        )
    log.warning(
        "attempt failed, no attempts left: %s",
        error["message"],
        extra=claimed.log_fields(),
    )
    return Outcome(task_id, attempt, TaskStatus.FAILED, error=error, lease=claimed.lease)


def type_retry_delay(
    task_type: TaskType | None, *, base: float, cap: float
) -> Callable[[int], float]:
    """The backoff of ``task_type``'s retries: its own ``retry_base``/``retry_max``/
    ``retry_jitter`` where it sets them, else the consumer's RETRY_BASE_DELAY and
    RETRY_MAX_DELAY (``base``, ``cap``) and the default jitter."""
    jitter = DEFAULT_JITTER
    if task_type is not None:
        base = task_type.retry_base or base
        cap = task_type.retry_max or cap
        if task_type.retry_jitter is not None:
            jitter = task_type.retry_jitter
    return functools.partial(backoff_delay, base=base, cap=cap, jitter=jitter)


async def _call_hooks(registry: TaskRegistry, event: AttemptEvent, claimed: ClaimedTask) -> None:
    """Call every hook for ``event`` in turn. A hook that raises is logged and skipped:
    error reporting and tracing must never change how an attempt ends."""
    for hook in registry.hooks[event.event]:
        try:
            returned = hook(event)
            if inspect.isawaitable(returned):
                await returned
        except Exception:
            log.exception(
                "%s hook %s raised; ignored",
                event.event,
                getattr(hook, "__qualname__", repr(hook)),
                extra=claimed.log_fields(),
            )


async def _run_handler(
    task_type: TaskType, payload: BaseModel, ctx: TaskContext, executor: Executor | None
) -> Any:
    if task_type.is_async:
        return await task_type.handler(payload, ctx)
    # run_in_executor does not carry contextvars over; the copy brings the task's log
    # fields (and a tracer's span) into the thread.
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(
        executor, context.run, task_type.handler, payload, ctx
    )


_END_EVENTS: dict[str, HookEvent] = {
    TaskStatus.DONE: "success",
    TaskStatus.NEW: "retry",
    TaskStatus.FAILED: "failure",
}


async def run_attempt(
    claimed: ClaimedTask,
    registry: TaskRegistry,
    default_timeout: float,
    retry_delay: Callable[[int], float],
    stop_reason: Callable[[], StopReason | None] = _never_stopped,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    executor: Executor | None = None,
) -> Outcome:
    """Run the handler and say how the attempt ended; never raises.

    ``stop_reason`` tells a cancellation the consumer asked for (and why) from one it
    did not: that one is an ordinary failed attempt, so a run always ends in an outcome.
    A plain ``def`` handler runs in ``executor`` (the loop's default one when None).
    The registry's hooks are told of the start and of a success, retry or failure.
    """
    task_id, attempt = claimed.task_id, claimed.attempt
    context = TaskContext(task_id, attempt, claimed.max_attempts)
    result: Any = None
    error: Exception | None = None
    try:
        await _call_hooks(registry, AttemptEvent("start", claimed.type, context), claimed)
        task_type = registry.get(claimed.type)
        if task_type is None:
            raise UnknownTaskType(f"no handler for task type {claimed.type!r} in this consumer")
        try:
            payload = task_type.parse_payload(claimed.payload)
        except ValidationError as exc:
            raise PermanentError(f"payload no longer valid: {exc.errors()[0]['msg']}") from None
        limit = task_type.timeout or default_timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                result = await _run_handler(task_type, payload, context, executor)
        except TimeoutError:
            if deadline.expired():
                raise AttemptTimedOut(f"the attempt exceeded its {limit:g}s timeout") from None
            raise  # the handler's own TimeoutError: an ordinary failure
        outcome = Outcome(
            task_id,
            attempt,
            TaskStatus.DONE,
            result=_json_result(result, max_result_bytes),
            lease=claimed.lease,
        )
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            current.uncancel()
        reason = stop_reason()
        if reason is not None:
            return stopped_outcome(claimed, reason)  # the consumer stopped it: no end hook
        error = HandlerCancelled("the handler was cancelled, not by the consumer")
        outcome = failed_outcome(claimed, error, retry_delay)
    except Exception as exc:
        error = exc
        outcome = failed_outcome(claimed, exc, retry_delay)
    end = _END_EVENTS.get(outcome.status)
    if end is not None:
        event = AttemptEvent(
            end,
            claimed.type,
            context,
            result=result if end == "success" else None,
            error=error,
            retry_in=outcome.retry_in if end == "retry" else None,
        )
        try:
            await _call_hooks(registry, event, claimed)
        except asyncio.CancelledError:
            # The outcome is known: a stop that lands during the hooks does not lose it.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                current.uncancel()
    return outcome
