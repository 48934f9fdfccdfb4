"""consumer/attempt.py run_attempt: how one attempt ends, with a registry of test types."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, ConfigDict

from consumer.attempt import ClaimedTask, run_attempt
from db.execution import Outcome
from db.states import TaskStatus
from tasktypes import PermanentError, TaskContext, TaskRegistry

TASK_ID = uuid.UUID("5d0b1c3e-8a2f-4e61-b7c9-0f1e2d3c4b5a")
DEFAULT_TIMEOUT = 5.0
TINY_TIMEOUT = 0.01


class Numbers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: int
    b: int = 1


class Empty(BaseModel):
    pass


class Report(BaseModel):
    total: int
    at: datetime
    ids: list[uuid.UUID]


class Opaque(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    thing: object


@dataclass
class Gate:
    """Lets a test know a handler is running, and keeps it running until told."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    contexts: list[TaskContext] = field(default_factory=list)
    payloads: list[BaseModel] = field(default_factory=list)


@dataclass
class RecordingDelay:
    calls: list[int] = field(default_factory=list)

    def __call__(self, attempt: int) -> float:
        self.calls.append(attempt)
        return attempt * 10.0


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def registry(gate: Gate) -> TaskRegistry:
    registry = TaskRegistry()

    async def add(payload: Numbers, ctx: TaskContext) -> dict[str, Any]:
        gate.contexts.append(ctx)
        gate.payloads.append(payload)
        return {"sum": payload.a + payload.b, "list": [None, True, 1.5]}

    async def report(payload: Empty, ctx: TaskContext) -> Report:
        return Report(total=2, at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), ids=[TASK_ID])

    async def nothing(payload: Empty, ctx: TaskContext) -> None:
        return None

    async def boom(payload: Empty, ctx: TaskContext) -> None:
        raise RuntimeError("kaput")

    async def permanent(payload: Empty, ctx: TaskContext) -> None:
        raise PermanentError("the file is gone for good")

    async def slow(payload: Empty, ctx: TaskContext) -> None:
        await asyncio.sleep(10)

    async def not_json(payload: Empty, ctx: TaskContext) -> set[int]:
        return {1, 2}

    async def opaque(payload: Empty, ctx: TaskContext) -> Opaque:
        return Opaque(thing=object())

    async def wait(payload: Empty, ctx: TaskContext) -> None:
        gate.started.set()
        await asyncio.Event().wait()

    registry.register("add", Numbers, add)
    registry.register("report", Empty, report)
    registry.register("nothing", Empty, nothing)
    registry.register("boom", Empty, boom)
    registry.register("permanent", Empty, permanent)
    registry.register("slow", Empty, slow)
    registry.register("slow-with-own-timeout", Empty, slow, timeout=TINY_TIMEOUT)
    registry.register("not-json", Empty, not_json)
    registry.register("opaque", Empty, opaque)
    registry.register("wait", Empty, wait)
    return registry


@pytest.fixture
def delay() -> RecordingDelay:
    return RecordingDelay()


def claimed(
    task_type: str, payload: Any = None, *, attempt: int = 1, max_attempts: int = 3
) -> ClaimedTask:
    return ClaimedTask(
        TASK_ID, task_type, {} if payload is None else payload, attempt, max_attempts
    )


def result_json(outcome: Outcome) -> Any:
    assert isinstance(outcome.result, orjson.Fragment)
    return orjson.loads(orjson.dumps(outcome.result))


# -- success ----------------------------------------------------------------------------


async def test_done_with_the_json_result(
    registry: TaskRegistry, delay: RecordingDelay, gate: Gate
) -> None:
    outcome = await run_attempt(
        claimed("add", {"a": 2}, attempt=2, max_attempts=5), registry, DEFAULT_TIMEOUT, delay
    )
    assert outcome.status == TaskStatus.DONE
    assert (outcome.task_id, outcome.attempt, outcome.error, outcome.retry_in) == (
        TASK_ID,
        2,
        None,
        0.0,
    )
    assert result_json(outcome) == {"sum": 3, "list": [None, True, 1.5]}
    # The handler got the validated model and the attempt's context.
    assert gate.payloads == [Numbers(a=2, b=1)]
    assert gate.contexts == [TaskContext(TASK_ID, 2, 5)]
    assert delay.calls == []


async def test_done_with_a_pydantic_model_result_dumped_as_json(
    registry: TaskRegistry, delay: RecordingDelay
) -> None:
    outcome = await run_attempt(claimed("report"), registry, DEFAULT_TIMEOUT, delay)
    assert outcome.status == TaskStatus.DONE
    assert result_json(outcome) == {
        "total": 2,
        "at": "2026-01-02T03:04:05Z",
        "ids": [str(TASK_ID)],
    }


async def test_done_with_a_none_result(registry: TaskRegistry, delay: RecordingDelay) -> None:
    outcome = await run_attempt(claimed("nothing"), registry, DEFAULT_TIMEOUT, delay)
    assert outcome.status == TaskStatus.DONE
    assert result_json(outcome) is None


# -- retryable failures -----------------------------------------------------------------


async def test_a_raising_handler_is_retried_while_attempts_remain(
    registry: TaskRegistry, delay: RecordingDelay
) -> None:
    outcome = await run_attempt(
        claimed("boom", attempt=2, max_attempts=3), registry, DEFAULT_TIMEOUT, delay
    )
    assert outcome == Outcome(
        TASK_ID,
        2,
        TaskStatus.NEW,
        error={"type": "RuntimeError", "message": "kaput"},
        retry_in=20.0,
    )
    assert delay.calls == [2]


async def test_a_raising_handler_fails_the_task_on_its_last_attempt(
    registry: TaskRegistry, delay: RecordingDelay, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="consumer.attempt"):
        outcome = await run_attempt(
            claimed("boom", attempt=3, max_attempts=3), registry, DEFAULT_TIMEOUT, delay
        )
    assert outcome == Outcome(
        TASK_ID, 3, TaskStatus.FAILED, error={"type": "RuntimeError", "message": "kaput"}
    )
    assert delay.calls == []
    [record] = caplog.records
    assert record.getMessage() == "attempt failed, no attempts left: kaput"
    assert record.__dict__["task_id"] == str(TASK_ID)


async def test_a_long_error_message_is_cut_to_2000_characters(
    delay: RecordingDelay,
) -> None:
    registry = TaskRegistry()

    async def verbose(payload: Empty, ctx: TaskContext) -> None:
        raise ValueError("x" * 5000)

    registry.register("verbose", Empty, verbose)
    outcome = await run_attempt(claimed("verbose"), registry, DEFAULT_TIMEOUT, delay)
    assert outcome.error is not None
    assert outcome.error["message"] == "x" * 2000


@pytest.mark.parametrize(
    ("task_type", "default_timeout"),
    [("slow", TINY_TIMEOUT), ("slow-with-own-timeout", DEFAULT_TIMEOUT)],
    ids=["consumer-default", "type-timeout"],
)
async def test_a_handler_over_its_timeout_is_retried_as_handler_timeout(
    registry: TaskRegistry, delay: RecordingDelay, task_type: str, default_timeout: float
) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    outcome = await run_attempt(claimed(task_type), registry, default_timeout, delay)
    assert loop.time() - began < 1.0
    assert outcome == Outcome(
        TASK_ID,
        1,
        TaskStatus.NEW,
        error={"type": "HandlerTimeout", "message": "the attempt exceeded its 0.01s timeout"},
        retry_in=10.0,
    )


async def test_a_timeout_on_the_last_attempt_fails_the_task(
    registry: TaskRegistry, delay: RecordingDelay
) -> None:
    outcome = await run_attempt(
        claimed("slow", attempt=1, max_attempts=1), registry, TINY_TIMEOUT, delay
    )
    assert outcome.status == TaskStatus.FAILED
    assert outcome.error == {
        "type": "HandlerTimeout",
        "message": "the attempt exceeded its 0.01s timeout",
    }


async def test_a_timeout_error_raised_by_the_handler_itself_is_an_ordinary_failure(
    delay: RecordingDelay,
) -> None:
    async def own_timeout(payload: Empty, ctx: TaskContext) -> None:
        raise TimeoutError("upstream API timed out")

    registry = TaskRegistry()
    registry.register("own-timeout", Empty, own_timeout)
    outcome = await run_attempt(claimed("own-timeout"), registry, DEFAULT_TIMEOUT, delay)
    assert outcome.status == TaskStatus.NEW
    assert outcome.error == {"type": "TimeoutError", "message": "upstream API timed out"}


async def test_an_unknown_task_type_is_retryable(
    registry: TaskRegistry, delay: RecordingDelay
) -> None:
    outcome = await run_attempt(claimed("renamed-away"), registry, DEFAULT_TIMEOUT, delay)
    assert outcome == Outcome(
        TASK_ID,
        1,
        TaskStatus.NEW,
        error={
            "type": "UnknownTaskType",
            "message": "no handler for task type 'renamed-away' in this consumer",
        },
        retry_in=10.0,
    )


# -- permanent failures -----------------------------------------------------------------


async def test_a_permanent_error_fails_at_once(
    registry: TaskRegistry, delay: RecordingDelay
) -> None:
    outcome = await run_attempt(
        claimed("permanent", attempt=1, max_attempts=10), registry, DEFAULT_TIMEOUT, delay
    )
    assert outcome == Outcome(
        TASK_ID,
        1,
        TaskStatus.FAILED,
        error={"type": "PermanentError", "message": "the file is gone for good"},
    )
    assert delay.calls == []


async def test_a_payload_that_no_longer_validates_fails_at_once(
    registry: TaskRegistry, delay: RecordingDelay, gate: Gate
) -> None:
    outcome = await run_attempt(
        claimed("add", {"a": "two"}, attempt=1, max_attempts=10), registry, DEFAULT_TIMEOUT, delay
    )
    assert outcome == Outcome(
        TASK_ID,
        1,
        TaskStatus.FAILED,
        error={
            "type": "PermanentError",
            "message": "payload no longer valid: "
            "Input should be a valid integer, unable to parse string as an integer",
        },
    )
    assert gate.payloads == []  # the handler never ran
    assert delay.calls == []


async def test_a_non_json_result_fails_at_once(
    registry: TaskRegistry, delay: RecordingDelay
) -> None:
    outcome = await run_attempt(
        claimed("not-json", attempt=1, max_attempts=10), registry, DEFAULT_TIMEOUT, delay
    )
    assert outcome == Outcome(
        TASK_ID,
        1,
        TaskStatus.FAILED,
        error={
            "type": "UnserializableResult",
            "message": "the handler's result is not JSON: Type is not JSON serializable: set",
        },
    )


async def test_a_model_result_that_cannot_be_dumped_fails_at_once(
    registry: TaskRegistry, delay: RecordingDelay
) -> None:
    outcome = await run_attempt(
        claimed("opaque", attempt=1, max_attempts=10), registry, DEFAULT_TIMEOUT, delay
    )
    assert outcome.status == TaskStatus.FAILED
    assert outcome.error is not None
    assert outcome.error["type"] == "UnserializableResult"
    assert delay.calls == []


# -- cancellation -----------------------------------------------------------------------


async def _start_waiting(
    task: ClaimedTask, registry: TaskRegistry, delay: RecordingDelay, gate: Gate
) -> asyncio.Task[Outcome]:
    running = asyncio.create_task(run_attempt(task, registry, DEFAULT_TIMEOUT, delay))
    async with asyncio.timeout(1):
        await gate.started.wait()
    return running


async def test_cancel_on_request_ends_cancelled(
    registry: TaskRegistry, delay: RecordingDelay, gate: Gate
) -> None:
    task = claimed("wait", attempt=2, max_attempts=3)
    running = await _start_waiting(task, registry, delay, gate)
    task.stop_reason = "cancel"
    running.cancel()
    outcome = await running
    assert outcome == Outcome(
        TASK_ID,
        2,
        TaskStatus.CANCELLED,
        error={"type": "Cancelled", "message": "cancelled on request while running"},
    )
    assert running.cancelling() == 0  # the cancellation was consumed, not left pending
    assert delay.calls == []


async def test_cancel_at_shutdown_hands_the_task_back_pending(
    registry: TaskRegistry, delay: RecordingDelay, gate: Gate
) -> None:
    task = claimed("wait", attempt=1, max_attempts=1)
    running = await _start_waiting(task, registry, delay, gate)
    task.stop_reason = "shutdown"
    running.cancel()
    outcome = await running
    assert outcome == Outcome(TASK_ID, 1, TaskStatus.PENDING)
    assert running.cancelling() == 0


async def test_a_cancellation_nobody_asked_for_propagates(
    registry: TaskRegistry, delay: RecordingDelay, gate: Gate
) -> None:
    running = await _start_waiting(claimed("wait"), registry, delay, gate)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert running.cancelled()
    assert delay.calls == []
