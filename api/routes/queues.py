"""/api/v1/queues: the named queues, what waits and runs in each, who serves it, and
pausing and resuming one."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.exceptions import HTTPException

from taskbox.api.auth import caller_name
from taskbox.api.deps import Pool
from taskbox.api.routes.responses import NOT_JSON, TOO_LARGE
from taskbox.api.schemas import (
    Problem,
    QueueAction,
    QueueDetail,
    QueueList,
    QueuePaused,
    QueueResumed,
)
from taskbox.db import queues
from taskbox.runtime.queues import MAX_QUEUE_NAME

router = APIRouter(
    prefix="/api/v1/queues",
    tags=["queues"],
    responses={401: {"model": Problem, "description": "The API key is missing or not valid"}},
)

_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "The database is unreachable"}
}
_INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": Problem, "description": "The queue name or the body is invalid"}
}

# The rule of taskbox.runtime.queues.check_queue_name, for the path and the OpenAPI
# document alike: a name that breaks it is a 422 saying so.
QueueName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_QUEUE_NAME,
        pattern=r"^[a-z0-9][a-z0-9_-]*$",
        description="A queue name: lowercase letters, digits, '-' and '_'.",
        examples=["media"],
    ),
]


@router.get(
    "",
    response_model=QueueList,
    summary="List the queues",
    description=(
        "Every queue in use (one with unfinished tasks, recently served by a consumer, or "
        "paused, and `default` always), by name: its waiting (NEW, PENDING) and running "
        "tasks, the consumers seen serving it within the last minute, whether it is "
        "paused, and how long its oldest waiting task has waited. A queue with tasks "
        "waiting and no consumer is one no consumer is configured for (CONSUMER_QUEUES)."
    ),
    responses=_UNAVAILABLE,
)
async def list_queues(pool: Pool) -> QueueList:
    found = await queues.list_queues(pool)
    return QueueList.model_validate({"items": [asdict(queue) for queue in found]})


async def _detail(pool: Pool, name: str, *, known: bool = False) -> dict[str, Any]:
    """The queue with its events; a 404 for a name never used, paused or resumed
    (``known``: the caller just paused or resumed it)."""
    view, history = await queues.describe(pool, name, known=known)
    if view is None:
        raise HTTPException(404, f"no queue {name!r} is in use (no tasks, consumers or pause)")
    return {**asdict(view), "events": [asdict(event) for event in history]}


@router.get(
    "/{name}",
    response_model=QueueDetail,
    summary="Show one queue",
    description="The queue as the listing shows it, with its latest pauses and resumes "
    "(who, when, why).",
    responses={
        404: {"model": Problem, "description": "No queue of this name is in use"},
        **_INVALID,
        **_UNAVAILABLE,
    },
)
async def get_queue(name: QueueName, pool: Pool) -> QueueDetail:
    return QueueDetail.model_validate(await _detail(pool, name))


@router.post(
    "/{name}/pause",
    response_model=QueuePaused,
    summary="Pause a queue",
    description=(
        "From the relays' next claim on, the queue's waiting and newly created tasks stay "
        "NEW in the outbox (scheduled and retried ones too, once due), and its consumers "
        "stop taking messages within QUEUE_PAUSE_CHECK_INTERVAL; tasks already running "
        "finish normally, and messages already in RabbitMQ stay there. Recorded with the "
        "API key's name and the reason. Pausing a paused queue changes nothing "
        "(`changed: false`). Any valid name may be paused, also one not in use yet."
    ),
    responses={**TOO_LARGE, **NOT_JSON, **_INVALID, **_UNAVAILABLE},
)
async def pause_queue(
    name: QueueName, action: QueueAction, request: Request, pool: Pool
) -> QueuePaused:
    actor = caller_name(request.headers.get("authorization"), request.app.state.api_key_names)
    changed = await queues.pause(pool, name, actor, action.reason)
    detail = await _detail(pool, name, known=True)
    return QueuePaused.model_validate({**detail, "changed": changed})


@router.post(
    "/{name}/resume",
    response_model=QueueResumed,
    summary="Resume a queue",
    description=(
        "The queue's parked tasks are published again, in order of due time (RabbitMQ "
        "orders them by priority), a chunk at a time from the relays' next wake-up (the "
        "resume itself takes constant time), and its consumers take messages again "
        "within QUEUE_PAUSE_CHECK_INTERVAL. Recorded with the API key's name and the reason. "
        "Resuming a queue that is not paused changes nothing (`changed: false`)."
    ),
    responses={
        404: {"model": Problem, "description": "No queue of this name is in use"},
        **TOO_LARGE,
        **NOT_JSON,
        **_INVALID,
        **_UNAVAILABLE,
    },
)
async def resume_queue(
    name: QueueName, action: QueueAction, request: Request, pool: Pool
) -> QueueResumed:
    actor = caller_name(request.headers.get("authorization"), request.app.state.api_key_names)
    parked = await queues.resume(pool, name, actor, action.reason, request.app.state.outbox_channel)
    detail = await _detail(pool, name, known=parked is not None)
    return QueueResumed.model_validate(
        {**detail, "changed": parked is not None, "unparked": parked or 0}
    )
