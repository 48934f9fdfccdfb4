"""One attempt of one task: run its handler under a timeout and turn the end into an Outcome."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from consumer.lifecycle import StopReason
from db.execution import Outcome
from db.states import TaskStatus
from db.storable import UnstorablePayload, check_storable
from runtime import tracing
from runtime.logs import task_fields
from tasktypes import PermanentError, TaskContext, TaskRegistry

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


async def run_attempt(
    claimed: ClaimedTask,
    registry: TaskRegistry,
    default_timeout: float,
    retry_delay: Callable[[int], float],
    stop_reason: Callable[[], StopReason | None] = _never_stopped,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
) -> Outcome:
    """Run the handler and say how the attempt ended; never raises.

    ``stop_reason`` tells a cancellation the consumer asked for (and why) from one it
    did not: that one is an ordinary failed attempt, so a run always ends in an outcome.
    """
    task_id, attempt = claimed.task_id, claimed.attempt
    try:
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
                result = await task_type.handler(
                    payload, TaskContext(task_id, attempt, claimed.max_attempts)
                )
        except TimeoutError:
            if deadline.expired():
                raise AttemptTimedOut(f"the attempt exceeded its {limit:g}s timeout") from None
            raise  # the handler's own TimeoutError: an ordinary failure
        return Outcome(
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
        if reason is None:
            return failed_outcome(
                claimed,
                HandlerCancelled("the handler was cancelled, not by the consumer"),
                retry_delay,
            )
        return stopped_outcome(claimed, reason)
    except Exception as exc:
        return failed_outcome(claimed, exc, retry_delay)
