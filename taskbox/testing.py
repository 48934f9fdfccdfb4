"""Run a handler in a user's unit test, without Postgres, RabbitMQ or a consumer process.

``run("resize", {...})`` does what a create and one attempt would do: the payload is
validated and normalised by the type's model as the api does (an invalid one raises
pydantic's ``ValidationError``, where the api answers 422), then the attempt runs
through the consumer's own ``run_attempt``, so timeouts, ``Retry``, ``PermanentError``,
hooks, plain ``def`` handlers and the result checks behave as in production. Policy the
type does not set comes from the consumer's defaults (HANDLER_TIMEOUT, RETRY_BASE_DELAY,
RETRY_MAX_DELAY, MAX_RESULT_BYTES), never from the environment.

This imports the consumer: it is for tests, not for a program that only submits tasks
(that one imports ``taskbox.client``).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from taskbox.consumer.attempt import ClaimedTask, UnknownTaskType, run_attempt, type_retry_delay
from taskbox.consumer.settings import ConsumerSettings
from taskbox.db.states import TaskStatus
from taskbox.tasktypes.registry import TaskRegistry, default_registry

__all__ = ["DEFAULT_MAX_ATTEMPTS", "AttemptOutcome", "UnknownTaskType", "run", "run_sync"]

# The api's DEFAULT_MAX_ATTEMPTS default: what a create gets when neither it nor its type
# sets max_attempts (tests/unit/test_testing.py holds the two together).
DEFAULT_MAX_ATTEMPTS = 3

_CONSUMER_DEFAULTS = {name: field.default for name, field in ConsumerSettings.model_fields.items()}

_STATUSES: dict[str, Literal["DONE", "RETRY", "FAILED"]] = {
    TaskStatus.DONE: "DONE",
    TaskStatus.NEW: "RETRY",  # the task goes back to NEW, due again in retry_in seconds
    TaskStatus.FAILED: "FAILED",
}


@dataclass(frozen=True, slots=True)
class AttemptOutcome:
    """How the attempt ended. ``status`` is ``DONE`` (``result`` set), ``RETRY`` (the
    attempt failed and another is due in ``retry_in`` seconds; ``error`` set) or
    ``FAILED`` (for good; ``error`` set). ``result`` is the JSON the api would show
    (a returned pydantic model as its dict, say); ``error`` is the task's ``error`` as
    the api shows it, ``{"type": ..., "message": ...}``."""

    status: Literal["DONE", "RETRY", "FAILED"]
    result: Any = None
    error: dict[str, str] | None = None
    retry_in: float | None = None


async def run(
    type_name: str,
    payload: Any,
    *,
    registry: TaskRegistry | None = None,
    attempt: int = 1,
    max_attempts: int | None = None,
) -> AttemptOutcome:
    """Run one attempt of a ``type_name`` task with ``payload``.

    ``registry`` defaults to ``default_registry``, the one ``@task`` fills: import the
    module of your handlers first. ``attempt`` of ``max_attempts`` is the attempt to
    play (the last one fails instead of retrying); ``max_attempts`` defaults to what the
    api gives a create that omits it: the type's ``max_attempts``, else 3.
    """
    registry = default_registry if registry is None else registry
    task_type = registry.get(type_name)
    if task_type is None:
        known = ", ".join(registry.names()) or "none"
        raise UnknownTaskType(f"unknown task type {type_name!r}; registered: {known}")
    # As the api stores it (api/service.py), so the consumer's own parse sees the same.
    stored = task_type.parse_payload(payload).model_dump(mode="json", by_alias=True)
    if max_attempts is None:
        max_attempts = task_type.max_attempts or DEFAULT_MAX_ATTEMPTS
    if not 1 <= attempt <= max_attempts:
        raise ValueError(f"attempt must be within 1..{max_attempts}, not {attempt}")
    claimed = ClaimedTask(uuid.uuid4(), type_name, stored, attempt, max_attempts)
    retry_delay = type_retry_delay(
        task_type,
        base=_CONSUMER_DEFAULTS["retry_base_delay"],
        cap=_CONSUMER_DEFAULTS["retry_max_delay"],
    )
    outcome = await run_attempt(
        claimed,
        registry,
        _CONSUMER_DEFAULTS["handler_timeout"],
        retry_delay,
        max_result_bytes=_CONSUMER_DEFAULTS["max_result_bytes"],
    )
    # Nothing stops this attempt from outside, so it never ends CANCELLED or PENDING.
    status = _STATUSES[outcome.status]
    return AttemptOutcome(
        status,
        result=orjson.loads(orjson.dumps(outcome.result)) if status == "DONE" else None,
        error=outcome.error,
        retry_in=outcome.retry_in if status == "RETRY" else None,
    )


def run_sync(
    type_name: str,
    payload: Any,
    *,
    registry: TaskRegistry | None = None,
    attempt: int = 1,
    max_attempts: int | None = None,
) -> AttemptOutcome:
    """``run`` for a test without an event loop (``asyncio.run`` underneath; inside a
    running loop, ``await run(...)`` instead)."""
    return asyncio.run(
        run(type_name, payload, registry=registry, attempt=attempt, max_attempts=max_attempts)
    )
