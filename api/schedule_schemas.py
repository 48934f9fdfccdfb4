"""Request and response bodies of /api/v1/schedules."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from taskbox.runtime.queues import MAX_QUEUE_NAME
from taskbox.schedules.naming import SCHEDULE_NAME_PATTERN
from taskbox.schedules.timing import CatchUp

# Over the API, no schedule ticks faster than once a second: a client's typo of
# 0.001 would otherwise create a task per millisecond (catch_up=all: a hundred a pass).
MIN_INTERVAL = 1.0

_TIMING = "Give exactly one of `cron` (five fields, read in `timezone`) and `interval_seconds`."


class _ScheduleFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: str = Field(min_length=1, max_length=200, description="A registered task type.")
    payload: dict[str, Any] = Field(
        default_factory=dict, description="The payload of every tick's task, checked now."
    )
    cron: str | None = Field(
        None, max_length=200, description="A five-field cron line, e.g. `0 6 * * 1-5`."
    )
    interval_seconds: float | None = Field(
        None,
        ge=MIN_INTERVAL,
        allow_inf_nan=False,
        description=f"Every this many seconds (at least {MIN_INTERVAL:g}) instead of cron.",
    )
    timezone: str = Field("UTC", max_length=64, description="IANA zone the cron line is read in.")
    priority: int = Field(0, ge=0, le=9, description="Priority of every tick's task.")
    queue: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_QUEUE_NAME,
        description="Queue of the tasks; the type's own if absent.",
    )
    max_attempts: int | None = Field(
        None, ge=1, description="Attempts of every tick's task; the type's or server's default."
    )
    catch_up: CatchUp = Field(
        "skip",
        description="After ticks were missed (no scheduler running, or paused): `skip` "
        "creates one task for the latest, `all` one per missed tick, at most "
        "SCHEDULE_CATCH_UP_MAX.",
    )
    paused: bool = Field(False, description="A paused schedule creates no tasks.")


class ScheduleCreate(_ScheduleFields):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "weekday-report",
                    "type": "echo",
                    "payload": {"report": "daily"},
                    "cron": "0 6 * * 1-5",
                    "timezone": "Europe/Berlin",
                },
                {"name": "heartbeat", "type": "echo", "interval_seconds": 60},
            ]
        },
    )
    name: str = Field(
        pattern=SCHEDULE_NAME_PATTERN,
        description="1-128 letters, digits and `. _ : -`. " + _TIMING,
    )


class ScheduleUpdate(BaseModel):
    """Only the fields given change. Giving `cron` drops the interval and the other way
    round; a changed timing starts the schedule afresh from now."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Left out: unchanged. Only queue, max_attempts (back to the type's own) and the
    # timing fields may be given as null; the document shows the others without null,
    # which the service refuses with a 422 naming the field.
    type: Annotated[str, Field(min_length=1, max_length=200)] | SkipJsonSchema[None] = None
    payload: dict[str, Any] | SkipJsonSchema[None] = None
    cron: str | None = Field(None, max_length=200)
    interval_seconds: float | None = Field(None, ge=MIN_INTERVAL, allow_inf_nan=False)
    timezone: Annotated[str, Field(max_length=64)] | SkipJsonSchema[None] = None
    priority: Annotated[int, Field(ge=0, le=9)] | SkipJsonSchema[None] = None
    queue: str | None = Field(None, min_length=1, max_length=MAX_QUEUE_NAME)
    max_attempts: int | None = Field(None, ge=1)
    catch_up: CatchUp | SkipJsonSchema[None] = None
    paused: bool | SkipJsonSchema[None] = None


class Schedule(BaseModel):
    name: str
    type: str
    payload: dict[str, Any]
    cron: str | None
    interval_seconds: float | None
    timezone: str
    priority: int
    queue: str
    max_attempts: int
    catch_up: CatchUp
    paused: bool
    source: Literal["api", "code"] = Field(
        description="`code`: declared in a task module, read-only here."
    )
    next_fire_at: datetime = Field(description="The next tick not yet turned into a task.")
    created_at: datetime
    updated_at: datetime


class Tick(BaseModel):
    task_id: uuid.UUID
    status: str
    fire_at: datetime | None = Field(description="The tick's fire time; null for a run now.")
    created_at: datetime


class ScheduleDetail(Schedule):
    next_fire_times: list[datetime] = Field(description="The next five fire times (UTC).")
    last_ticks: list[Tick] = Field(
        description="The last ten ticks' tasks, and the last ten run-now tasks, newest first."
    )


class ScheduleList(BaseModel):
    items: list[Schedule]
