"""taskbox.testing, the users' test double: a handler run as the api and the consumer
would run it, with no servers."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from pydantic import BaseModel, Field, ValidationError

import tests.unit.sample_task_module  # noqa: F401 - registers sample-greet on default_registry
from taskbox import AttemptEvent, PermanentError, Retry, TaskContext, TaskRegistry
from taskbox.api.settings import ApiSettings
from taskbox.testing import DEFAULT_MAX_ATTEMPTS, AttemptOutcome, UnknownTaskType, run, run_sync


class Order(BaseModel):
    sku: str = Field(alias="SKU")
    quantity: int = Field(1, gt=0)


class Receipt(BaseModel):
    sku: str
    total: int


@pytest.fixture
def registry() -> TaskRegistry:
    registry = TaskRegistry()

    @registry.task("receipt", Order)
    async def receipt(payload: Order, ctx: TaskContext) -> Receipt:
        return Receipt(sku=payload.sku, total=payload.quantity * 5)

    @registry.task("threaded", Order)
    def threaded(payload: Order, ctx: TaskContext) -> dict[str, Any]:
        return {"thread": threading.current_thread() is not threading.main_thread()}

    @registry.task("refuse", Order)
    def refuse(payload: Order, ctx: TaskContext) -> None:
        raise PermanentError("out of stock")

    @registry.task("later", Order, max_attempts=4)
    async def later(payload: Order, ctx: TaskContext) -> None:
        raise Retry(in_seconds=60, message="rate limited")

    @registry.task("flaky", Order, retry_base=10.0, retry_max=15.0)
    async def flaky(payload: Order, ctx: TaskContext) -> None:
        raise ConnectionError("upstream down")

    @registry.task("slow", Order, timeout=0.05)
    async def slow(payload: Order, ctx: TaskContext) -> None:
        await asyncio.sleep(5)

    @registry.task("unstorable", Order)
    async def unstorable(payload: Order, ctx: TaskContext) -> object:
        return object()

    return registry


async def test_a_done_attempt_returns_the_result_as_the_api_would_show_it(
    registry: TaskRegistry,
) -> None:
    # The payload is validated by alias and filled in as the api stores it; the returned
    # model comes back as its JSON.
    outcome = await run("receipt", {"SKU": "cat-food"}, registry=registry)
    assert outcome == AttemptOutcome("DONE", result={"sku": "cat-food", "total": 5})


def test_run_sync_runs_a_plain_def_handler_off_the_calling_thread(
    registry: TaskRegistry,
) -> None:
    outcome = run_sync("threaded", {"SKU": "x"}, registry=registry)
    assert outcome == AttemptOutcome("DONE", result={"thread": True})


async def test_an_invalid_payload_raises_as_the_api_would_refuse_it(
    registry: TaskRegistry,
) -> None:
    with pytest.raises(ValidationError, match="quantity"):
        await run("receipt", {"SKU": "x", "quantity": 0}, registry=registry)


async def test_an_unknown_type_raises_and_names_the_registered_ones(
    registry: TaskRegistry,
) -> None:
    with pytest.raises(UnknownTaskType, match="'nope'; registered: flaky, later"):
        await run("nope", {}, registry=registry)


async def test_a_permanent_error_fails_at_once(registry: TaskRegistry) -> None:
    outcome = await run("refuse", {"SKU": "x"}, registry=registry)
    assert outcome == AttemptOutcome(
        "FAILED", error={"type": "PermanentError", "message": "out of stock"}
    )


async def test_retry_asks_for_its_delay_until_the_types_last_attempt(
    registry: TaskRegistry,
) -> None:
    outcome = await run("later", {"SKU": "x"}, registry=registry, attempt=3)
    assert outcome == AttemptOutcome(
        "RETRY", error={"type": "Retry", "message": "rate limited"}, retry_in=60
    )
    # max_attempts defaults to the type's own (4), as the api fills it in.
    outcome = await run("later", {"SKU": "x"}, registry=registry, attempt=4)
    assert outcome.status == "FAILED"
    assert outcome.error == {"type": "Retry", "message": "rate limited"}


async def test_an_exception_is_retried_with_the_types_backoff(registry: TaskRegistry) -> None:
    outcome = await run("flaky", {"SKU": "x"}, registry=registry, attempt=2, max_attempts=5)
    assert outcome.status == "RETRY"
    assert outcome.error == {"type": "ConnectionError", "message": "upstream down"}
    # retry_base 10 before the 2nd attempt, doubled before the 3rd, capped at 15, jittered
    assert outcome.retry_in is not None and 7.5 <= outcome.retry_in <= 15.0
    outcome = await run("flaky", {"SKU": "x"}, registry=registry, attempt=3)
    assert outcome.status == "FAILED"  # the last of DEFAULT_MAX_ATTEMPTS


async def test_the_types_timeout_ends_the_attempt(registry: TaskRegistry) -> None:
    outcome = await run("slow", {"SKU": "x"}, registry=registry)
    assert outcome.status == "RETRY"
    assert outcome.error == {
        "type": "HandlerTimeout",
        "message": "the attempt exceeded its 0.05s timeout",
    }


async def test_a_result_that_is_not_json_fails_the_task(registry: TaskRegistry) -> None:
    outcome = await run("unstorable", {"SKU": "x"}, registry=registry)
    assert outcome.status == "FAILED"
    assert outcome.error is not None and outcome.error["type"] == "UnserializableResult"


async def test_the_registrys_hooks_are_called(registry: TaskRegistry) -> None:
    events: list[tuple[str, str]] = []

    @registry.on("start")
    @registry.on("success")
    @registry.on("failure")
    def record(event: AttemptEvent) -> None:
        events.append((event.event, event.task_type))

    await run("receipt", {"SKU": "x"}, registry=registry)
    await run("refuse", {"SKU": "x"}, registry=registry)
    assert events == [
        ("start", "receipt"),
        ("success", "receipt"),
        ("start", "refuse"),
        ("failure", "refuse"),
    ]


async def test_the_default_registry_is_the_one_task_fills() -> None:
    outcome = await run("sample-greet", {"name": "Ada"})
    assert outcome == AttemptOutcome("DONE", result={"greeting": "hello Ada"})


async def test_an_attempt_outside_max_attempts_is_refused(registry: TaskRegistry) -> None:
    with pytest.raises(ValueError, match=r"within 1\.\.3, not 4"):
        await run("receipt", {"SKU": "x"}, registry=registry, attempt=4)


def test_the_default_max_attempts_is_the_apis() -> None:
    assert ApiSettings.model_fields["default_max_attempts"].default == DEFAULT_MAX_ATTEMPTS
