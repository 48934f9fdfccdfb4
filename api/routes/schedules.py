"""/api/v1/schedules: periodic tasks made, read, changed, paused and run over the API.

Routes parse, call the schedule service, shape. Code schedules are listed with
``source: code`` and answer 409 to every change; "run now" works for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response, status

from taskbox.api import rendering
from taskbox.api.routes.responses import NOT_JSON, TOO_LARGE
from taskbox.api.schedule_schemas import (
    Schedule,
    ScheduleCreate,
    ScheduleDetail,
    ScheduleList,
    ScheduleUpdate,
    Tick,
)
from taskbox.api.schedules import ScheduleService
from taskbox.api.schemas import Problem, Task
from taskbox.schedules.naming import SCHEDULE_NAME_PATTERN

Responses = dict[int | str, dict[str, Any]]

router = APIRouter(
    prefix="/api/v1/schedules",
    tags=["schedules"],
    responses={401: {"model": Problem, "description": "The API key is missing or not valid"}},
)

_NOT_FOUND: Responses = {404: {"model": Problem, "description": "No schedule has this name"}}
_READ_ONLY: Responses = {
    409: {"model": Problem, "description": "The schedule is declared in code: read-only here"}
}
_INVALID: Responses = {
    422: {"model": Problem, "description": "The request is invalid; `errors` says where"}
}
_UNAVAILABLE: Responses = {503: {"model": Problem, "description": "The database is unreachable"}}

Name = Annotated[str, Path(pattern=SCHEDULE_NAME_PATTERN, description="The schedule's name.")]


def _service(request: Request) -> ScheduleService:
    service: ScheduleService = request.app.state.schedules
    return service


def _schedule(row: Mapping[str, Any]) -> dict[str, Any]:
    document = {field: row[field] for field in Schedule.model_fields if field != "type"}
    document["type"] = row["task_type"]
    return document


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Schedule,
    summary="Create a schedule",
    description=(
        "Every tick of the schedule (a five-field `cron` line read in `timezone`, or every "
        "`interval_seconds`) creates one task of `type` with `payload`, through the outbox "
        "like any task. The task is checked now as `POST /api/v1/tasks` checks one. "
        "A name that is taken is a 409. The `Location` header points at the schedule."
    ),
    responses={
        409: {"model": Problem, "description": "A schedule with this name exists"},
        **TOO_LARGE,
        **NOT_JSON,
        **_INVALID,
        **_UNAVAILABLE,
    },
)
async def create_schedule(body: ScheduleCreate, request: Request) -> Response:
    row = await _service(request).create(body)
    location = {"Location": f"{router.prefix}/{row['name']}"}
    return rendering.json_response(
        Schedule(**_schedule(row)).model_dump(mode="json"), 201, location
    )


@router.get(
    "",
    response_model=ScheduleList,
    summary="List the schedules",
    description="Every schedule, from code and from the API, by name, with its next fire time.",
    responses=_UNAVAILABLE,
)
async def list_schedules(request: Request) -> ScheduleList:
    rows = await _service(request).list()
    return ScheduleList(items=[Schedule(**_schedule(row)) for row in rows])


@router.get(
    "/{name}",
    response_model=ScheduleDetail,
    summary="Get a schedule, its next five fire times and its last ticks",
    responses={**_NOT_FOUND, **_INVALID, **_UNAVAILABLE},
)
async def get_schedule(name: Name, request: Request) -> ScheduleDetail:
    view = await _service(request).get(name)
    ticks = [
        Tick(
            task_id=tick["id"],
            status=tick["status"],
            fire_at=tick["fire_at"],
            created_at=tick["created_at"],
        )
        for tick in view.last_ticks
    ]
    return ScheduleDetail(
        **_schedule(view.row), next_fire_times=view.next_fire_times, last_ticks=ticks
    )


@router.patch(
    "/{name}",
    response_model=Schedule,
    summary="Change a schedule",
    description=(
        "Only the fields given change, from the schedule's next tick on. A new timing "
        "(`cron`, `interval_seconds`, `timezone`) starts the schedule afresh from now; "
        "`paused: false` resumes it, and missed ticks follow its `catch_up` policy."
    ),
    responses={**_NOT_FOUND, **_READ_ONLY, **TOO_LARGE, **NOT_JSON, **_INVALID, **_UNAVAILABLE},
)
async def update_schedule(name: Name, body: ScheduleUpdate, request: Request) -> Schedule:
    return Schedule(**_schedule(await _service(request).update(name, body)))


@router.post(
    "/{name}/pause",
    response_model=Schedule,
    summary="Pause a schedule",
    description="No tick creates a task until it is resumed; tasks already created stay.",
    responses={**_NOT_FOUND, **_READ_ONLY, **_INVALID, **_UNAVAILABLE},
)
async def pause_schedule(name: Name, request: Request) -> Schedule:
    return Schedule(**_schedule(await _service(request).set_paused(name, True)))


@router.post(
    "/{name}/resume",
    response_model=Schedule,
    summary="Resume a schedule",
    description="Ticks missed while paused follow the schedule's `catch_up` policy.",
    responses={**_NOT_FOUND, **_READ_ONLY, **_INVALID, **_UNAVAILABLE},
)
async def resume_schedule(name: Name, request: Request) -> Schedule:
    return Schedule(**_schedule(await _service(request).set_paused(name, False)))


@router.post(
    "/{name}/run",
    status_code=status.HTTP_201_CREATED,
    response_model=Task,
    summary="Run a schedule now",
    description=(
        "Creates one extra task of the schedule, due now, without moving its ticks; it "
        "is listed among the schedule's last ticks with no fire time."
    ),
    responses={**_NOT_FOUND, **_INVALID, **_UNAVAILABLE},
)
async def run_schedule_now(name: Name, request: Request) -> Response:
    task = await _service(request).run_now(name)
    return rendering.task_response(task, 201, {"Location": f"/api/v1/tasks/{task['id']}"})


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a schedule",
    description="No further ticks; the tasks it created stay.",
    responses={**_NOT_FOUND, **_READ_ONLY, **_INVALID, **_UNAVAILABLE},
)
async def delete_schedule(name: Name, request: Request) -> Response:
    await _service(request).delete(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
