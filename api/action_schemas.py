"""Bodies of the bulk actions (``POST /api/v1/tasks/cancel|retry``) and their audit
(``/api/v1/task-actions``)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from taskbox.api.params import IsoDatetime, StorableText
from taskbox.db.actions import MAX_IDS, SAMPLE_SIZE, TaskFilter
from taskbox.db.states import TaskStatus
from taskbox.runtime.queues import MAX_QUEUE_NAME, MAX_REASON, check_reason

EMPTY_FILTER = (
    "choose which tasks: status, type, queue, created_after, created_before or ids "
    '(every one given must hold), or "all": true to act on every task'
)


class BulkAction(BaseModel):
    """Which tasks (every criterion given must hold), why, and whether only to look."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"status": ["FAILED"], "type": "sha256", "reason": "bad deploy, INC-1234"},
                {"queue": "media", "reason": "image service gone", "dry_run": True},
            ]
        },
    )

    status: list[TaskStatus] | None = Field(
        None, max_length=len(TaskStatus), description="Tasks in any of these statuses."
    )
    type: Annotated[StorableText, StringConstraints(min_length=1, max_length=200)] | None = Field(
        None, description="Tasks of this type."
    )
    queue: (
        Annotated[
            str,
            StringConstraints(
                min_length=1, max_length=MAX_QUEUE_NAME, pattern=r"^[a-z0-9][a-z0-9_-]*$"
            ),
        ]
        | None
    ) = Field(None, description="Tasks of this queue.")
    created_after: IsoDatetime | None = Field(None, description="Created after (exclusive).")
    created_before: IsoDatetime | None = Field(
        None,
        description="Created before (exclusive); the action's start when not given or "
        "later, so that tasks created meanwhile are left alone.",
    )
    ids: list[uuid.UUID] | None = Field(
        None, min_length=1, max_length=MAX_IDS, description=f"These tasks (at most {MAX_IDS})."
    )
    all: bool = Field(
        False,
        description="Act on every task the other criteria (if any) select; required when "
        "none is given, so that a forgotten filter never means every task.",
    )
    reason: Annotated[str, StringConstraints(min_length=1, max_length=MAX_REASON)] = Field(
        description="Why: recorded in the action's audit row with the API key's name.",
        examples=["payment provider outage, INC-1234"],
    )
    dry_run: bool = Field(
        False, description="Count and show a sample of the selected tasks; change nothing."
    )

    @field_validator("reason")
    @classmethod
    def _reason_is_plain(cls, value: str) -> str:
        return check_reason(value)

    @model_validator(mode="after")
    def _checked(self) -> BulkAction:
        after, before = self.created_after, self.created_before
        if after is not None and before is not None and after >= before:
            raise ValueError("created_after must be earlier than created_before")
        if not (self.task_filter().has_criteria() or self.all):
            raise ValueError(EMPTY_FILTER)
        return self

    def task_filter(self) -> TaskFilter:
        return TaskFilter(
            statuses=tuple(dict.fromkeys(self.status or ())),
            type=self.type,
            queue=self.queue,
            created_after=self.created_after,
            created_before=self.created_before,
            ids=tuple(dict.fromkeys(self.ids or ())),
            everything=self.all,
        )


class BulkRetry(BulkAction):
    force: bool = Field(
        False,
        description="Retry DONE and CANCELLED tasks too, as `taskbox replay --force` does "
        "(PROCESSING ones never).",
    )


class TaskActionView(BaseModel):
    id: int
    action: Literal["cancel", "retry"]
    filter: dict[str, Any] = Field(description="The criteria as given.")
    reason: str
    actor: str = Field(description="The API key's name, or user@host for the CLI.")
    dry_run: bool
    matched: int = Field(description="Tasks the filter selected when the action started.")
    changed: int = Field(
        description="Tasks changed so far (a dry run: that it would change). A cancel "
        "counts cancelled and cancel-requested (PROCESSING) tasks alike."
    )
    skipped: int = Field(
        description="Tasks left as they were: in a status the action does not change, or "
        "changed by someone else meanwhile."
    )
    state: Literal["running", "done", "failed"]
    error: str | None
    started_at: datetime
    finished_at: datetime | None


class SampleTaskView(BaseModel):
    id: uuid.UUID
    status: TaskStatus
    type: str
    created_at: datetime


class BulkActionResult(TaskActionView):
    sample: list[SampleTaskView] | None = Field(
        None, description=f"A dry run: the first {SAMPLE_SIZE} selected tasks, oldest first."
    )


class TaskActionPage(BaseModel):
    items: list[TaskActionView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next, older page.")
