"""The handler API around run_attempt: sync handlers in a thread pool, per-type policy,
Retry(in_seconds) and hooks. No servers, as in test_attempt.py."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from taskbox.consumer.attempt import ClaimedTask, run_attempt, type_retry_delay
from taskbox.db.execution import Outcome
from taskbox.db.states import TaskStatus
from taskbox.tasktypes import AttemptEvent, Retry, TaskContext, TaskRegistry

TASK_ID = uuid.UUID("0c7e6f0a-3b0e-4a55-9d4b-6a1f2e3d4c5b")
LEASE = 3
DEFAULT_TIMEOUT = 5.0

request_name: contextvars.ContextVar[str] = contextvars.ContextVar("request_name", default="")


class Empty(BaseModel):
    pass


class Nap(BaseModel):
    seconds: float


def fixed_delay(attempt: int) -> float:
    return attempt * 10.0


def claimed(task_type: str, *, attempt: int = 1, max_attempts: int = 3) -> ClaimedTask:
    return ClaimedTask(TASK_ID, task_type, {}, attempt, max_attempts, lease=LEASE)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-handler")
    yield pool
    pool.shutdown(wait=True)


# -- sync handlers ----------------------------------------------------------------------


async def test_a_sync_handler_runs_in_the_pool_with_the_callers_context(
    executor: ThreadPoolExecutor,
) -> None:
    registry = TaskRegistry()

    @registry.task("where", Empty)
    def where(payload: Empty, ctx: TaskContext) -> dict[str, Any]:
        return {
            "thread": threading.current_thread().name.split("_")[0],
            "request": request_name.get(),
            "attempt": ctx.attempt,
        }

    request_name.set("the task's fields")
    outcome = await run_attempt(
        claimed("where"), registry, DEFAULT_TIMEOUT, fixed_delay, executor=executor
    )
    assert outcome.status == TaskStatus.DONE
    assert isinstance(outcome.result, orjson.Fragment)
    assert orjson.loads(orjson.dumps(outcome.result)) == {
        "thread": "test-handler",
        "request": "the task's fields",
        "attempt": 1,
    }


async def test_a_sync_handlers_exception_is_a_failed_attempt(
    executor: ThreadPoolExecutor,
) -> None:
    registry = TaskRegistry()

    @registry.task("boom", Empty)
    def boom(payload: Empty, ctx: TaskContext) -> None:
        raise OSError("disk on fire")

    outcome = await run_attempt(
        claimed("boom"), registry, DEFAULT_TIMEOUT, fixed_delay, executor=executor
    )
    assert outcome == Outcome(
        TASK_ID,
        1,
        TaskStatus.NEW,
        error={"type": "OSError", "message": "disk on fire"},
        retry_in=10.0,
        lease=LEASE,
    )


async def test_a_sync_handler_past_its_timeout_ends_the_attempt_while_the_thread_runs_on(
    executor: ThreadPoolExecutor,
) -> None:
    registry = TaskRegistry()
    finished = threading.Event()

    @registry.task("nap", Empty, timeout=0.05)
    def nap(payload: Empty, ctx: TaskContext) -> None:
        time.sleep(0.5)
        finished.set()

    started = time.monotonic()
    outcome = await run_attempt(
        claimed("nap"), registry, DEFAULT_TIMEOUT, fixed_delay, executor=executor
    )
    assert time.monotonic() - started < 0.4
    assert outcome.status == TaskStatus.NEW
    assert outcome.error == {
        "type": "HandlerTimeout",
        "message": "the attempt exceeded its 0.05s timeout",
    }
    assert not finished.is_set()  # a thread cannot be killed: it runs on
    assert await asyncio.to_thread(finished.wait, 2.0)


# -- Retry and per-type policy ----------------------------------------------------------


@pytest.fixture
def retrying() -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("later", Empty)
    async def later(payload: Empty, ctx: TaskContext) -> None:
        raise Retry(in_seconds=42, message="the upstream said 429")

    @registry.task("backoff", Empty)
    def backoff(payload: Empty, ctx: TaskContext) -> None:
        raise Retry()

    return registry


async def test_retry_in_seconds_asks_for_the_next_attempt_that_much_later(
    retrying: TaskRegistry,
) -> None:
    outcome = await run_attempt(claimed("later"), retrying, DEFAULT_TIMEOUT, fixed_delay)
    assert outcome.status == TaskStatus.NEW
    assert outcome.retry_in == 42
    assert outcome.error == {"type": "Retry", "message": "the upstream said 429"}


async def test_retry_without_in_seconds_takes_the_backoff(retrying: TaskRegistry) -> None:
    outcome = await run_attempt(
        claimed("backoff", attempt=2), retrying, DEFAULT_TIMEOUT, fixed_delay
    )
    assert outcome.status == TaskStatus.NEW
    assert outcome.retry_in == 20.0


async def test_retry_on_the_last_attempt_fails_the_task(retrying: TaskRegistry) -> None:
    outcome = await run_attempt(
        claimed("later", attempt=3, max_attempts=3), retrying, DEFAULT_TIMEOUT, fixed_delay
    )
    assert outcome.status == TaskStatus.FAILED
    assert outcome.error == {"type": "Retry", "message": "the upstream said 429"}


def test_retry_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="in_seconds"):
        Retry(in_seconds=-1)


def test_a_types_backoff_overrides_the_consumers() -> None:
    registry = TaskRegistry()
    registry.register("own", Empty, lambda p, c: None, retry_base=2.0, retry_max=600)
    registry.register("capped", Empty, lambda p, c: None, retry_max=3)
    registry.register("plain", Empty, lambda p, c: None)
    own = type_retry_delay(registry.get("own"), base=1.0, cap=300.0)
    capped = type_retry_delay(registry.get("capped"), base=1.0, cap=300.0)
    plain = type_retry_delay(registry.get("plain"), base=1.0, cap=300.0)
    unknown = type_retry_delay(None, base=1.0, cap=300.0)
    for _ in range(50):
        assert 4.0 <= own(3) <= 8.0  # 2 * 2**2, full jitter down to half
        assert 300.0 <= own(30) <= 600.0
        assert 1.5 <= capped(30) <= 3.0
        assert 2.0 <= plain(3) <= 4.0
        assert 2.0 <= unknown(3) <= 4.0


def test_a_type_keeps_its_policy() -> None:
    registry = TaskRegistry()

    @registry.task("resize", Empty, timeout=30, max_attempts=5, retry_base=2.0, retry_max=600)
    def resize(payload: Empty, ctx: TaskContext) -> None:
        return None

    task_type = registry.get("resize")
    assert task_type is not None
    assert (
        task_type.timeout,
        task_type.max_attempts,
        task_type.retry_base,
        task_type.retry_max,
    ) == (
        30,
        5,
        2.0,
        600,
    )
    assert not task_type.is_async
    with pytest.raises(ValueError, match="max_attempts"):
        registry.register("zero", Empty, resize, max_attempts=0)


# -- hooks ------------------------------------------------------------------------------


@pytest.fixture
def hooked() -> tuple[TaskRegistry, list[tuple[str, AttemptEvent]]]:
    registry = TaskRegistry()
    seen: list[tuple[str, AttemptEvent]] = []

    @registry.task("ok", Empty)
    async def ok(payload: Empty, ctx: TaskContext) -> int:
        return 7

    @registry.task("bad", Empty)
    def bad(payload: Empty, ctx: TaskContext) -> None:
        raise KeyError("missing")

    @registry.on("start")
    def on_start(event: AttemptEvent) -> None:
        seen.append(("sync", event))

    @registry.on("start")
    @registry.on("success")
    @registry.on("retry")
    @registry.on("failure")
    async def record(event: AttemptEvent) -> None:
        await asyncio.sleep(0)
        seen.append(("async", event))

    return registry, seen


async def test_hooks_see_start_and_success(
    hooked: tuple[TaskRegistry, list[tuple[str, AttemptEvent]]],
) -> None:
    registry, seen = hooked
    outcome = await run_attempt(claimed("ok"), registry, DEFAULT_TIMEOUT, fixed_delay)
    assert outcome.status == TaskStatus.DONE
    context = TaskContext(TASK_ID, 1, 3)
    assert seen == [
        ("sync", AttemptEvent("start", "ok", context)),
        ("async", AttemptEvent("start", "ok", context)),
        ("async", AttemptEvent("success", "ok", context, result=7)),
    ]


async def test_hooks_see_retry_then_failure_with_the_error(
    hooked: tuple[TaskRegistry, list[tuple[str, AttemptEvent]]],
) -> None:
    registry, seen = hooked
    await run_attempt(claimed("bad", attempt=2), registry, DEFAULT_TIMEOUT, fixed_delay)
    await run_attempt(claimed("bad", attempt=3), registry, DEFAULT_TIMEOUT, fixed_delay)
    ends = [event for _, event in seen if event.event != "start"]
    assert [(e.event, e.context.attempt, e.retry_in) for e in ends] == [
        ("retry", 2, 20.0),
        ("failure", 3, None),
    ]
    assert all(isinstance(e.error, KeyError) for e in ends)


async def test_a_raising_hook_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = TaskRegistry()
    calls: list[str] = []

    @registry.task("ok", Empty)
    async def ok(payload: Empty, ctx: TaskContext) -> int:
        return 7

    @registry.on("start")
    def broken_start(event: AttemptEvent) -> None:
        raise RuntimeError("tracer misconfigured")

    @registry.on("success")
    async def broken_success(event: AttemptEvent) -> None:
        raise RuntimeError("reporter down")

    @registry.on("success")
    def after(event: AttemptEvent) -> None:
        calls.append(event.event)

    with caplog.at_level(logging.ERROR, logger="taskbox.consumer.attempt"):
        outcome = await run_attempt(claimed("ok"), registry, DEFAULT_TIMEOUT, fixed_delay)
    assert outcome.status == TaskStatus.DONE
    assert calls == ["success"]  # a raising hook does not stop the next one
    messages = [r.getMessage() for r in caplog.records]
    assert any("start hook" in m and "broken_start" in m for m in messages), messages
    assert any("success hook" in m and "broken_success" in m for m in messages), messages


def test_a_types_retry_jitter_sets_how_much_of_each_backoff_is_random() -> None:
    registry = TaskRegistry()

    class Nothing(BaseModel):
        pass

    exact = registry.register(
        "exact", Nothing, lambda p, c: None, retry_base=2.0, retry_max=100.0, retry_jitter=0
    )
    spread = registry.register("spread", Nothing, lambda p, c: None, retry_jitter=1.0)
    default = registry.register("default", Nothing, lambda p, c: None)
    delay = type_retry_delay(exact, base=1.0, cap=60.0)
    assert [delay(n) for n in (1, 2, 3, 10)] == [2.0, 4.0, 8.0, 100.0]  # no randomness
    spread_delays = [type_retry_delay(spread, base=8.0, cap=60.0)(1) for _ in range(300)]
    assert min(spread_delays) < 4.0 <= max(spread_delays) <= 8.0  # below half the ceiling too
    default_delays = [type_retry_delay(default, base=8.0, cap=60.0)(1) for _ in range(300)]
    assert min(default_delays) >= 4.0 and max(default_delays) <= 8.0  # the top half
    with pytest.raises(ValueError, match="retry_jitter must be between 0 and 1"):
        registry.register("bad", Nothing, lambda p, c: None, retry_jitter=1.5)
