"""The schedule service: what /api/v1/schedules asks for, checked as a task create is.

A schedule's task is checked by the very rules of ``POST /api/v1/tasks``
(``TaskService.validate``: the type is registered, the payload fits its model, the
queue and max_attempts are allowed) when the schedule is made or changed, so a tick
never creates a task the API would have refused. Code schedules are read-only here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pydantic import ValidationError

from taskbox.api.schedule_schemas import ScheduleCreate, ScheduleUpdate
from taskbox.api.schemas import TaskCreate
from taskbox.api.service import InvalidRequest, TaskService
from taskbox.db import schedules as schedule_store
from taskbox.db.schedules import ScheduleDefinition
from taskbox.schedules.timing import InvalidTiming, next_fire_times, timing_of

Row = Mapping[str, Any]

NEXT_FIRE_TIMES = 5
LAST_TICKS = 10


class ScheduleNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"schedule {name!r} does not exist")


class ScheduleExists(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(f"a schedule named {name!r} exists already")


class ReadOnlySchedule(Exception):
    """A code schedule: it changes by changing the code that declares it."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"schedule {name!r} is declared in code (source: code) and is read-only over the "
            "API: change it where it is declared and deploy; it can still be run now"
        )


@dataclass(frozen=True, slots=True)
class ScheduleView:
    row: Row
    next_fire_times: list[datetime]
    last_ticks: list[Row]


class ScheduleService:
    def __init__(
        self, pool: asyncpg.Pool, tasks: TaskService, wake_relay: Callable[[], None]
    ) -> None:
        self._pool = pool
        self._tasks = tasks
        self._wake_relay = wake_relay

    def _definition(self, name: str, fields: Mapping[str, Any]) -> ScheduleDefinition:
        """The stored form of a schedule's fields, or InvalidRequest at the field."""
        try:
            timing_of(fields["cron"], fields["interval_seconds"], fields["timezone"])
        except InvalidTiming as exc:
            raise InvalidRequest.at(["body", exc.field], str(exc), "invalid_timing") from None
        try:
            request = TaskCreate.model_validate(
                {
                    "type": fields["type"],
                    "payload": fields["payload"],
                    "priority": fields["priority"],
                    "max_attempts": fields["max_attempts"],
                    "queue": fields["queue"],
                }
            )
        except ValidationError as exc:
            # The schedule's own schemas check these fields as the task's do; a rule the
            # task's model has and theirs lacks must still be a 422, never a 500.
            raise InvalidRequest(
                [
                    {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors(include_url=False, include_input=False)
                ]
            ) from None
        task = self._tasks.validate(request)
        return ScheduleDefinition(
            name=name,
            task_type=task.type,
            payload=task.payload,
            cron=fields["cron"],
            interval_seconds=fields["interval_seconds"],
            timezone=fields["timezone"],
            priority=task.priority,
            queue=task.queue,
            max_attempts=task.max_attempts,
            catch_up=fields["catch_up"],
            paused=fields["paused"],
        )

    async def create(self, body: ScheduleCreate) -> Row:
        definition = self._definition(body.name, body.model_dump(exclude={"name"}))
        row: Row | None = await schedule_store.create_schedule(
            self._pool, definition, datetime.now(UTC)
        )
        if row is None:
            raise ScheduleExists(body.name)
        return row

    async def list(self) -> list[Row]:
        return list(await schedule_store.list_schedules(self._pool))

    async def _row(self, name: str) -> Row:
        row: Row | None = await schedule_store.get_schedule(self._pool, name)
        if row is None:
            raise ScheduleNotFound(name)
        return row

    async def get(self, name: str) -> ScheduleView:
        row = await self._row(name)
        timing = timing_of(row["cron"], row["interval_seconds"], row["timezone"])
        upcoming = next_fire_times(timing, row["next_fire_at"], NEXT_FIRE_TIMES)
        ticks = await schedule_store.recent_ticks(self._pool, name, LAST_TICKS)
        return ScheduleView(row, upcoming, list(ticks))

    async def update(self, name: str, patch: ScheduleUpdate) -> Row:
        row = await self._row(name)
        if row["source"] == "code":
            raise ReadOnlySchedule(name)
        given = patch.model_dump(exclude_unset=True)
        for field, value in given.items():
            if value is None and field not in ("queue", "max_attempts", "cron", "interval_seconds"):
                raise InvalidRequest.at(["body", field], f"{field} cannot be null")
        fields: dict[str, Any] = {
            "type": row["task_type"],
            "payload": row["payload"],
            "cron": row["cron"],
            "interval_seconds": row["interval_seconds"],
            "timezone": row["timezone"],
            "priority": row["priority"],
            "queue": row["queue"],
            "max_attempts": row["max_attempts"],
            "catch_up": row["catch_up"],
            "paused": row["paused"],
        }
        if "type" in given and given["type"] != row["task_type"]:
            # The old type's queue and attempts are not the new type's to inherit.
            fields["queue"] = fields["max_attempts"] = None
        # One timing replaces the other: a cron line given drops the interval.
        if given.get("cron") is not None:
            fields["interval_seconds"] = None
        if given.get("interval_seconds") is not None:
            fields["cron"] = None
        fields.update(given)
        definition = self._definition(name, fields)
        updated: Row | None = await schedule_store.update_schedule(
            self._pool, definition, datetime.now(UTC)
        )
        if updated is None:
            raise ScheduleNotFound(name)  # deleted meanwhile
        return updated

    async def set_paused(self, name: str, paused: bool) -> Row:
        """Pause or resume, without checking the task again: a schedule whose type was
        since removed can still be paused (its ticks would fail every time)."""
        row = await self._row(name)
        if row["source"] == "code":
            raise ReadOnlySchedule(name)
        changed: Row | None = await schedule_store.set_paused(self._pool, name, paused)
        if changed is None:
            raise ScheduleNotFound(name)  # deleted meanwhile
        return changed

    async def delete(self, name: str) -> None:
        row = await self._row(name)
        if row["source"] == "code":
            raise ReadOnlySchedule(name)
        if not await schedule_store.delete_schedule(self._pool, name):
            raise ScheduleNotFound(name)

    async def run_now(self, name: str) -> Row:
        """One extra task of the schedule, due now; the schedule does not move."""
        row = await self._row(name)
        async with self._pool.acquire() as conn:
            task: Row = await schedule_store.run_now(conn, row)
        self._wake_relay()
        return task
