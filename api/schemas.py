"""Request and response bodies of the REST API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from taskbox.api.params import IsoDatetime
from taskbox.db.states import TaskStatus
from taskbox.runtime.queues import DEFAULT_QUEUE, MAX_QUEUE_NAME, MAX_REASON, check_reason
from taskbox.webhooks.destinations import MAX_URL


class TaskCreate(BaseModel):
    # strict: a priority of true or "5" is a client bug worth a 422, not a guess.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"type": "echo", "payload": {"x": 1}},
                {"type": "sha256", "payload": {"text": "hello"}, "priority": 5},
                {"type": "sleep", "payload": {"seconds": 2}, "max_attempts": 5},
                {"type": "echo", "payload": {"x": 1}, "delay_seconds": 30},
                {"type": "echo", "payload": {"x": 1}, "run_at": "2026-12-24T18:00:00Z"},
                {"type": "echo", "payload": {"x": 1}, "queue": "default"},
            ]
        },
    )

    type: str = Field(min_length=1, max_length=200, description="A registered task type.")
    payload: dict[str, Any] = Field(
        default_factory=dict, description="JSON object checked against the type's payload model."
    )
    priority: int = Field(0, ge=0, le=9, description="0 (lowest) to 9.")
    max_attempts: int | None = Field(
        None,
        ge=1,
        description="Attempts before the task fails; when absent, the task type's default, "
        "else the server's (DEFAULT_MAX_ATTEMPTS).",
    )
    run_at: IsoDatetime | None = Field(
        None,
        description="Run no earlier than this moment (ISO 8601 with a UTC offset). The task "
        "stays NEW until then and can be cancelled meanwhile; a moment in the past runs now.",
    )
    delay_seconds: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="Run no earlier than this many seconds from now; instead of `run_at`.",
    )
    queue: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_QUEUE_NAME,
        description="The queue to route the task to: one the task type is registered for. "
        "When absent, the type's own queue.",
    )
    callback_url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_URL,
        description="An http(s) URL the task's outcome (task.done, task.failed, "
        "task.cancelled) is POSTed to as a signed webhook (signed with "
        "WEBHOOK_CALLBACK_SECRET, which must be set); checked like a webhook's URL.",
    )


MAX_BATCH = 1000


class TaskBatchCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "tasks": [
                        {"type": "echo", "payload": {"x": 1}},
                        {"type": "sha256", "payload": {"text": "hello"}, "priority": 5},
                    ]
                }
            ]
        },
    )

    tasks: list[TaskCreate] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description=f"1 to {MAX_BATCH} tasks, each as `POST /api/v1/tasks` takes it.",
    )


class TaskError(BaseModel):
    type: str
    message: str


_EXAMPLE_TASK: dict[str, Any] = {
    "id": "0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11",
    "type": "echo",
    "status": "DONE",
    "priority": 0,
    "payload": {"x": 1},
    "result": {"x": 1},
    "error": None,
    "attempts": 1,
    "max_attempts": 3,
    "cancel_requested": False,
    "created_at": "2026-11-26T12:00:00.000001Z",
    "updated_at": "2026-11-26T12:00:00.004000Z",
    "started_at": "2026-11-26T12:00:00.002000Z",
    "finished_at": "2026-11-26T12:00:00.004000Z",
    "run_at": None,
    "queue": "default",
}


class TaskSummary(BaseModel):
    """A task as the list shows it: everything but its payload and its result."""

    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [{k: v for k, v in _EXAMPLE_TASK.items() if k not in ("payload", "result")}]
        },
    )

    id: uuid.UUID
    type: str
    status: TaskStatus
    priority: int
    error: TaskError | None = Field(
        None, description="The last attempt's error (its message cut to about 2,000 characters)."
    )
    attempts: int
    max_attempts: int
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    run_at: datetime | None = Field(
        None, description="When a scheduled task may run; null when it runs at once."
    )
    queue: str = Field(DEFAULT_QUEUE, description="The queue the task is routed to.")


class Task(TaskSummary):
    """The whole task."""

    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [_EXAMPLE_TASK]})

    payload: dict[str, Any]
    result: Any = Field(None, description="The handler's return value once DONE.")


class TaskBatch(BaseModel):
    items: list[Task] = Field(description="The created tasks, in the order they were sent.")


class TaskStatusView(BaseModel):
    id: uuid.UUID
    status: TaskStatus
    updated_at: datetime


ListView = Literal["summary", "full"]


class TaskSummaryPage(BaseModel):
    """A page of the list (the default, `view=summary`)."""

    items: list[TaskSummary] = Field(description="Up to `limit` tasks, newest first.")
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


class TaskPage(BaseModel):
    """A page of the list with `view=full`: whole tasks, within MAX_PAGE_BYTES."""

    items: list[Task] = Field(
        description="Up to `limit` tasks, newest first, whose payloads, results and errors "
        "come to at most MAX_PAGE_BYTES (1 MiB by default) of JSON; the first task comes "
        "even when it alone is larger. A page may hold fewer than `limit` tasks and still "
        "have a `next_cursor`."
    )
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


class Problem(BaseModel):
    """RFC 9457 problem details: the one shape of every error response."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "about:blank",
                    "title": "Not Found",
                    "status": 404,
                    "detail": "task 0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11 does not exist",
                    "instance": "/api/v1/tasks/0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11",
                    "request_id": "5d1b0e8f6c2a4f7e9b3d1a0c8e6f4b2d",
                }
            ]
        }
    )

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(
        None, description="Per-field problems of a 422: location, message, kind."
    )
    request_id: str | None = Field(
        None, description="This request's X-Request-ID, the key to the server's log lines."
    )


class QueueView(BaseModel):
    """A queue: what waits and runs in it, and whether anything serves it."""

    name: str
    waiting: int = Field(description="Tasks NEW or PENDING in the queue.")
    running: int = Field(description="Tasks PROCESSING from the queue.")
    consumers: int = Field(
        description="Consumers that reported serving the queue within the last minute; 0 "
        "with tasks waiting means nothing will run them until a consumer for it starts."
    )
    paused: bool = Field(
        description="Whether the queue is paused: its waiting tasks stay NEW and its "
        "consumers take no new messages until it is resumed."
    )
    paused_at: datetime | None = Field(None, description="When it was paused; null if not.")
    paused_by: str | None = Field(
        None, description="Who paused it: the API key's name, or the operator's user@host."
    )
    pause_reason: str | None = Field(None, description="Why it was paused.")
    oldest_waiting_seconds: float | None = Field(
        description="How long the longest-waiting task that may run now has waited, in "
        "seconds; null when none waits."
    )


class QueueList(BaseModel):
    items: list[QueueView]


class QueueEvent(BaseModel):
    """One pause or resume of a queue: the audit trail."""

    id: int
    action: Literal["pause", "resume"]
    at: datetime
    actor: str = Field(description="The API key's name, or the operator's user@host.")
    reason: str


class QueueDetail(QueueView):
    events: list[QueueEvent] = Field(description="Its latest pauses and resumes, newest first.")


class QueueAction(BaseModel):
    """Why a queue is paused or resumed: recorded with who did it."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(min_length=1, max_length=MAX_REASON)] = Field(
        description="Why: recorded in the queue's events with the API key's name.",
        examples=["payment provider down, INC-1234"],
    )

    @field_validator("reason")
    @classmethod
    def _reason_is_plain(cls, value: str) -> str:
        return check_reason(value)


class QueuePaused(QueueDetail):
    changed: bool = Field(description="False when the queue was paused already.")


class QueueResumed(QueueDetail):
    changed: bool = Field(description="False when the queue was not paused.")
    unparked: int = Field(
        description="Outbox rows of the queue that waited for the resume and go out now."
    )
