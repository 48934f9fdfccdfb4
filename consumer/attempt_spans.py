"""The consumer's ``task attempt`` span: one CONSUMER span per claimed attempt.

Its parent is the context on the message (the api's ``task.create``, which a retry's
outbox row keeps), so an attempt sits in the trace of the request that created its
task, retries included. It starts at the claim and ends when the attempt's outcome is
committed, so its outcome attribute is what Postgres recorded, not what the handler
hoped: ``done``, ``retry``, ``failed``, ``cancelled``, ``released`` (handed back at
shutdown), ``superseded`` (the task changed owner meanwhile; nothing written) or
``lost`` (the heartbeat found the task rescued). A failed attempt, retried or not, has
the error status with the error's type and message.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context

from taskbox.consumer.attempt import ClaimedTask
from taskbox.db.execution import Outcome
from taskbox.db.states import TaskStatus

SPAN_NAME = "task attempt"
OUTCOME = "taskbox.task.outcome"


def start_attempt_span(tracer: trace.Tracer, claimed: ClaimedTask, queue: str) -> trace.Span:
    return tracer.start_span(
        SPAN_NAME,
        # An empty context when the message carries none: its own trace, never the
        # claim loop's current context.
        context=claimed.trace.context() if claimed.trace is not None else Context(),
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.destination.name": queue,
            "taskbox.task.id": str(claimed.task_id),
            "taskbox.task.type": claimed.type,
            "taskbox.task.attempt": claimed.attempt,
            "taskbox.task.max_attempts": claimed.max_attempts,
            "taskbox.outbox.id": claimed.outbox_id or 0,
        },
    )


def outcome_name(outcome: Outcome, recorded: str | None) -> str:
    """What became of the attempt: ``outcome`` as the commit ``recorded`` it."""
    if recorded is None:
        return "superseded"
    if recorded == TaskStatus.NEW:
        # A release is recorded as NEW, like a retry; the outcome asked tells them apart.
        return "released" if outcome.status == TaskStatus.PENDING else "retry"
    return recorded.lower()


def end_attempt_span(span: trace.Span, outcome: Outcome | None, recorded: str | None) -> None:
    """End the span with the committed outcome (``outcome`` None: the attempt was lost)."""
    name = "lost" if outcome is None else outcome_name(outcome, recorded)
    span.set_attribute(OUTCOME, name)
    if outcome is not None and name in ("retry", "failed") and outcome.error is not None:
        error = outcome.error
        span.set_attribute("error.type", error["type"])
        if outcome.retry_in:
            span.set_attribute("taskbox.task.retry_in", outcome.retry_in)
        span.set_status(trace.StatusCode.ERROR, f"{error['type']}: {error['message']}")
    span.end()
