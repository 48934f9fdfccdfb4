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

from taskbox.consumer.attempt import ClaimedTask, run_attempt
from taskbox.consumer.lifecycle import StopReason
from taskbox.db.execution import Outcome
from taskbox.db.states import TaskStatus
from taskbox.tasktypes import PermanentError, TaskContext, TaskRegistry

TASK_ID = uuid.UUID("5d0b1c3e-8a2f-4e61-b7c9-0f1e2d3c4b5a")
LEASE = 7
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
        TASK_ID, task_type, {} if payload is None else payload, attempt, max_attempts, lease=LEASE
    )


def expected(*args: Any, **kwargs: Any) -> Outcome:
    """The outcome the attempt must end with, under the claim's lease."""
    return Outcome(*args, lease=LEASE, **kwargs)


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
    assert outcome == expected(
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
    with caplog.at_level(logging.WARNING, logger="taskbox.consumer.attempt"):
        outcome = await run_attempt(
            claimed("boom", attempt=3, max_attempts=3), registry, DEFAULT_TIMEOUT, delay
        )
    assert outcome == expected(
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
    assert outcome == expected(
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
    assert outcome == expected(
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
    assert outcome == expected(
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
    assert outcome == expected(
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
    assert outcome == expected(
        TASK_ID,
        1,
        TaskStatus.FAILED,
        error={
            "type": "UnserializableResult",
            "message": "the handler's result is not JSON: Type is not JSON serializable: set",
        },
    )


async def test_a_result_over_max_result_bytes_fails_at_once(
    registry: TaskRegistry, delay: RecordingDelay
) -> None:
    # "report" returns a small JSON object; a limit below its size refuses it.
    small = await run_attempt(claimed("report"), registry, DEFAULT_TIMEOUT, delay)
    assert small.status == TaskStatus.DONE and small.result is not None
    size = len(orjson.dumps(small.result))
    outcome = await run_attempt(
        claimed("report", attempt=1, max_attempts=10),
        registry,
        DEFAULT_TIMEOUT,
        delay,
        max_result_bytes=size - 1,
    )
    assert outcome == expected(
        TASK_ID,
        1,
        TaskStatus.FAILED,
        error={
            "type": "UnserializableResult",
            "message": f"the handler's result is {size} bytes of JSON, more than "
            f"MAX_RESULT_BYTES ({size - 1})",
        },
    )
    exact = await run_attempt(
        claimed("report"), registry, DEFAULT_TIMEOUT, delay, max_result_bytes=size
    )
    assert exact.status == TaskStatus.DONE


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


@dataclass
class StopReasonBox:
    """Stands in for the consumer's execution: the reason it asked the handler to stop."""

    reason: StopReason | None = None

    def __call__(self) -> StopReason | None:
        return self.reason


async def _start_waiting(
    task: ClaimedTask,
    registry: TaskRegistry,
    delay: RecordingDelay,
    gate: Gate,
    stop: StopReasonBox,
) -> asyncio.Task[Outcome]:
    running = asyncio.create_task(run_attempt(task, registry, DEFAULT_TIMEOUT, delay, stop))
    async with asyncio.timeout(1):
        await gate.started.wait()
    return running


async def test_cancel_on_request_ends_cancelled(
    registry: TaskRegistry, delay: RecordingDelay, gate: Gate
) -> None:
    task = claimed("wait", attempt=2, max_attempts=3)
    stop = StopReasonBox()
    running = await _start_waiting(task, registry, delay, gate, stop)
    stop.reason = "cancel"
    running.cancel()
    outcome = await running
    assert outcome == expected(
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
    stop = StopReasonBox()
    running = await _start_waiting(task, registry, delay, gate, stop)
    stop.reason = "shutdown"
    running.cancel()
    outcome = await running
    assert outcome == expected(TASK_ID, 1, TaskStatus.PENDING)
    assert running.cancelling() == 0


async def test_a_cancellation_nobody_asked_for_is_a_failed_attempt(
    registry: TaskRegistry, delay: RecordingDelay, gate: Gate
) -> None:
    # Bug: it used to propagate, ending the run with no outcome and the task PROCESSING
    # (heartbeated, never rescued) for good.
    running = await _start_waiting(
        claimed("wait", attempt=1, max_attempts=3), registry, delay, gate, StopReasonBox()
    )
    running.cancel()
    outcome = await running
    assert outcome.status == TaskStatus.NEW
    assert outcome.error is not None
    assert outcome.error["type"] == "HandlerCancelled"
    assert delay.calls == [1]
    assert not running.cancelled()


async def test_an_inner_task_cancelled_by_a_library_fails_the_attempt(
    delay: RecordingDelay,
) -> None:
    registry = TaskRegistry()

    async def awaits_a_cancelled_task(payload: Empty, ctx: TaskContext) -> None:
        inner = asyncio.create_task(asyncio.sleep(10))
        asyncio.get_running_loop().call_soon(inner.cancel)  # as a library might
        await inner

    registry.register("inner", Empty, awaits_a_cancelled_task)
    outcome = await run_attempt(claimed("inner", max_attempts=1), registry, DEFAULT_TIMEOUT, delay)
    assert outcome.status == TaskStatus.FAILED
    assert outcome.error is not None and outcome.error["type"] == "HandlerCancelled"


@pytest.mark.parametrize(
    ("result", "where"),
    [
        ({"text": "nul \x00 inside"}, "at ['text']: text may not contain NUL"),
        ({"list": ["ok", "a \\u0000 is text", "\\\x00"]}, "at ['list'][2]"),
        ({"key \x00": 1}, "at [" + repr("key \x00") + "]"),
        ({"list": ["ok", "lone \ud800 surrogate"]}, "not JSON: str is not valid UTF-8"),
        ({"big": 2**70}, "not JSON: Integer exceeds 64-bit range"),
    ],
)
async def test_a_result_postgres_cannot_store_fails_the_attempt_alone(
    delay: RecordingDelay, result: Any, where: str
) -> None:
    registry = TaskRegistry()

    async def returns(payload: Empty, ctx: TaskContext) -> Any:
        return result

    registry.register("unstorable", Empty, returns)
    outcome = await run_attempt(claimed("unstorable"), registry, DEFAULT_TIMEOUT, delay)
    assert outcome.status == TaskStatus.FAILED
    assert outcome.error is not None
    assert outcome.error["type"] == "UnserializableResult"
    assert where in outcome.error["message"]
    assert delay.calls == []  # permanent: the same code returns the same result again
    orjson.dumps(outcome.error)


async def test_a_result_with_an_escaped_backslash_u0000_text_is_stored(
    delay: RecordingDelay,
) -> None:
    registry = TaskRegistry()

    async def returns(payload: Empty, ctx: TaskContext) -> Any:
        return {"text": "a literal \\u0000 is six characters, not a NUL"}

    registry.register("text", Empty, returns)
    outcome = await run_attempt(claimed("text"), registry, DEFAULT_TIMEOUT, delay)
    assert outcome.status == TaskStatus.DONE


async def test_an_error_message_postgres_cannot_store_is_made_storable(
    delay: RecordingDelay,
) -> None:
    registry = TaskRegistry()

    async def raises(payload: Empty, ctx: TaskContext) -> None:
        raise RuntimeError("bad \x00 byte and \udc80 half")

    registry.register("raises", Empty, raises)
    outcome = await run_attempt(claimed("raises"), registry, DEFAULT_TIMEOUT, delay)
    assert outcome.error == {"type": "RuntimeError", "message": "bad \ufffd byte and \ufffd half"}
    orjson.dumps(outcome.error)  # the encoder takes it now
