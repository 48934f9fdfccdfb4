"""The API's bodies as the client reads and sends them.

These are the client's own models, written from the OpenAPI document the api serves
(``/openapi.json``), not imported from the server: a user of the client installs no
server. tests/integration/test_client.py compares their JSON schemas with that document,
so a field added, dropped or retyped on either side fails a test rather than a user.

Unknown fields in a response are ignored, so an older client keeps reading a newer api.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class TaskStatus(StrEnum):
    NEW = "NEW"
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        """DONE, FAILED and CANCELLED: no further change without an operator's replay."""
        return self in (TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED)


class NewTask(BaseModel):
    """A task to create: the body of ``POST /api/v1/tasks``, one item of a batch."""

    type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(0, ge=0, le=9)
    max_attempts: int | None = Field(None, ge=1)
    run_at: datetime | None = None
    delay_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    queue: str | None = Field(None, min_length=1, max_length=64)  # None: the type's own
    # where the outcome is posted as a signed webhook (the server needs
    # WEBHOOK_CALLBACK_SECRET); None: nowhere
    callback_url: str | None = Field(None, min_length=1, max_length=2048)

    def body(self) -> dict[str, Any]:
        """The JSON body: fields left at None are not sent, so the server's defaults apply."""
        return self.model_dump(mode="json", exclude_none=True)


class TaskError(BaseModel):
    type: str
    message: str


class TaskSummary(BaseModel):
    """A task as the list shows it: everything but its payload and its result."""

    id: uuid.UUID
    type: str
    status: TaskStatus
    priority: int
    error: TaskError | None = None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    run_at: datetime | None = None
    queue: str = "default"


class Task(TaskSummary):
    """The whole task."""

    payload: dict[str, Any]
    result: Any = None


class TaskStatusView(BaseModel):
    """``GET /api/v1/tasks/{id}/status``."""

    id: uuid.UUID
    status: TaskStatus
    updated_at: datetime


class TaskSummaryPage(BaseModel):
    """A page of the list (``view=summary``)."""

    items: list[TaskSummary]
    next_cursor: str | None = None


class TaskPage(BaseModel):
    """A page of the list with ``view=full``."""

    items: list[Task]
    next_cursor: str | None = None


class TaskBatch(BaseModel):
    """The answer of ``POST /api/v1/tasks/batch``: the created tasks, in the order sent."""

    items: list[Task]


class Problem(BaseModel):
    """RFC 9457 problem details: the body of every error the task API answers."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None
    request_id: str | None = None
