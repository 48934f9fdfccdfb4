"""One attempt of one task: run its handler under a timeout and turn the end into an Outcome."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ValidationError

from db.execution import Outcome
from db.states import TaskStatus
from runtime import tracing
from runtime.logs import task_fields
from tasktypes import PermanentError, TaskContext, TaskRegistry

log = logging.getLogger(__name__)

StopReason = Literal["cancel", "shutdown"]


class UnknownTaskType(Exception):
    """This consumer has no handler for the task's type (a TASK_MODULES mismatch)."""


class UnserializableResult(PermanentError):
    pass


class AttemptTimedOut(Exception):
    """The handler ran past its timeout; retried like any other failure."""


@dataclass(slots=True)
class ClaimedTask:
    task_id: Any
    type: str
    payload: Any
    attempt: int
    max_attempts: int
    stop_reason: StopReason | None = field(default=None)
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


def error_of(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)[:2000]}


def _json_result(result: Any) -> orjson.Fragment:
    try:
        if isinstance(result, BaseModel):
            result = result.model_dump(mode="json", by_alias=True)
        return orjson.Fragment(orjson.dumps(result))
    except (TypeError, ValueError) as exc:  # pydantic's serialization error is a ValueError
        raise UnserializableResult(f"the handler's result is not JSON: {exc}") from None


async def run_attempt(
    claimed: ClaimedTask,
    registry: TaskRegistry,
    default_timeout: float,
    retry_delay: Callable[[int], float],
) -> Outcome:
    """Never raises except for a cancellation it was not asked for."""
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
        return Outcome(task_id, attempt, TaskStatus.DONE, result=_json_result(result))
    except asyncio.CancelledError:
        if claimed.stop_reason is None:
            raise
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        if claimed.stop_reason == "cancel":
            return Outcome(
                task_id,
                attempt,
                TaskStatus.CANCELLED,
                error={"type": "Cancelled", "message": "cancelled on request while running"},
            )
        # Shutdown: hand the task back untouched so another consumer runs it.
        return Outcome(task_id, attempt, TaskStatus.PENDING)
    except PermanentError as exc:
        return Outcome(task_id, attempt, TaskStatus.FAILED, error=error_of(exc))
    except Exception as exc:
        error = error_of(exc)
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
            )
        log.warning(
            "attempt failed, no attempts left: %s",
            error["message"],
            extra=claimed.log_fields(),
        )
        return Outcome(task_id, attempt, TaskStatus.FAILED, error=error)
