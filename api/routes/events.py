"""Server-sent event streams of tasks: one task's status changes, or every matching change.

``/api/v1/tasks/events`` cannot be taken for a task: task paths match UUIDs only.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints

from taskbox.api import waiting
from taskbox.api.deps import Service
from taskbox.api.schemas import Problem
from taskbox.api.task_events import EventFilter, TaskEventHub
from taskbox.db.states import TaskStatus
from taskbox.runtime.queues import MAX_QUEUE_NAME

router = APIRouter(
    prefix="/api/v1/tasks",
    tags=["events"],
    responses={401: {"model": Problem, "description": "The API key is missing or not valid"}},
)

_EVENT_STREAM = "text/event-stream"
# Filters are matched in memory against the events, never sent to Postgres; bounded so
# that a stream's filter costs little per event.
_TypeName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
_QueueName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUEUE_NAME)]
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Problem,
        "description": "The database is unreachable, or this api process already serves "
        "TASK_WAIT_MAX_WAITERS waiting requests and streams (then with Retry-After)",
    }
}
_STREAM_DOC = (
    "Each event is `event: task` with `data` a JSON object `{id, status, type, queue}`. "
    "A comment line (`: keep-alive`) every TASK_EVENTS_HEARTBEAT seconds (15 by default) "
    "keeps a quiet stream open through proxies; `retry:` asks EventSource to reconnect "
    "after 3 s. Events carry no ids: nothing is replayed on reconnect."
)


# One event as an event-stream parser reads it (what the OpenAPI document's schema of a
# text/event-stream response describes, item by item).
_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["task", "resync"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "`task`: `{id, status, type, queue}`; `resync`: `{reason}`",
        },
        "retry": {"type": "integer", "description": "Milliseconds before a reconnect"},
    },
    "required": ["data"],
}
_STREAM_OK = {
    "description": "The event stream",
    "content": {_EVENT_STREAM: {"schema": _EVENT_SCHEMA}},
}


def _streaming(body: Any) -> StreamingResponse:
    return StreamingResponse(body, media_type=_EVENT_STREAM, headers=waiting.EVENT_STREAM_HEADERS)


@router.get(
    "/events",
    summary="Stream the status changes of many tasks",
    description=(
        "Every status change that matches the filters (creating a task is none), as it is "
        "committed, for TASK_EVENTS_MAX_STREAM seconds (600 by default); then the stream "
        "ends and EventSource reconnects. Filters repeat to match several values; none "
        "matches every task. An `event: resync` says changes may have been missed (the "
        "api reconnected to the database, or the client fell behind; then the stream "
        "ends): list afresh. " + _STREAM_DOC
    ),
    response_class=StreamingResponse,
    responses={
        200: _STREAM_OK,
        422: {"model": Problem, "description": "A filter is invalid; `errors` says which"},
        503: {
            "model": Problem,
            "description": "This api process already serves TASK_WAIT_MAX_WAITERS waiting "
            "requests and streams (with Retry-After)",
        },
    },
)
async def stream_task_events(
    request: Request,
    type_: Annotated[
        list[_TypeName] | None,
        Query(alias="type", max_length=20, description="Repeat to match several."),
    ] = None,
    queue: Annotated[
        list[_QueueName] | None, Query(max_length=20, description="Repeat to match several.")
    ] = None,
    status_: Annotated[
        list[TaskStatus] | None, Query(alias="status", description="Repeat to match several.")
    ] = None,
) -> StreamingResponse:
    hub: TaskEventHub = request.app.state.task_events
    limits = request.app.state.task_wait_limits
    subscription = hub.subscribe(
        event_filter=EventFilter(
            types=frozenset(type_ or ()),
            queues=frozenset(queue or ()),
            statuses=frozenset(status_ or ()),
        )
    )
    return _streaming(
        waiting.many_tasks_stream(
            hub, subscription, heartbeat=limits.heartbeat, lifetime=limits.max_stream
        ),
    )


@router.get(
    "/{task_id:uuid}/events",
    summary="Stream one task's status changes",
    description=(
        "The task's state at once, then one event per status it takes, in order; the "
        "stream ends after DONE, FAILED or CANCELLED (or after TASK_EVENTS_MAX_STREAM "
        "seconds; a reconnect starts again with the current state). " + _STREAM_DOC
    ),
    response_class=StreamingResponse,
    responses={
        200: _STREAM_OK,
        404: {"model": Problem, "description": "No task has this id, or the id is not a UUID"},
        **_UNAVAILABLE,
    },
)
async def stream_one_task(
    task_id: uuid.UUID, request: Request, service: Service
) -> StreamingResponse:
    hub: TaskEventHub = request.app.state.task_events
    limits = request.app.state.task_wait_limits
    # Subscribed before the read: a change committed after it is heard.
    subscription = hub.subscribe(task_id)
    try:
        first = await service.get(task_id)
    except BaseException:
        hub.unsubscribe(subscription)
        raise
    return _streaming(
        waiting.one_task_stream(
            hub,
            service.get,
            subscription,
            first,
            heartbeat=limits.heartbeat,
            lifetime=limits.max_stream,
        ),
    )
