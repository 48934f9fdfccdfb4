"""/api/v1/tasks: create, list, get, status, cancel. Routes parse, call the service, shape."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import StringConstraints, TypeAdapter, ValidationError

from taskbox.api import rendering, waiting
from taskbox.api.deps import Service
from taskbox.api.params import IsoDatetime, StorableText
from taskbox.api.routes.responses import NOT_JSON, TOO_LARGE
from taskbox.api.schemas import (
    MAX_BATCH,
    ListView,
    Problem,
    Task,
    TaskBatch,
    TaskBatchCreate,
    TaskCreate,
    TaskPage,
    TaskStatusView,
    TaskSummaryPage,
)
from taskbox.api.service import InvalidRequest, TaskService
from taskbox.db.states import TaskStatus

Responses = dict[int | str, dict[str, Any]]

# Task paths take only a UUID (`{task_id:uuid}`): /api/v1/tasks/batch is then the batch
# resource alone, so a GET there is a 405 that names POST rather than a lookup of a
# task called "batch"; a path that is no UUID names no task and is a 404. The task id
# is thus never invalid, and the operations that take nothing else document no 422
# (api.app drops the one FastAPI adds for the path parameter).

_UNAUTHORIZED: Responses = {
    401: {"model": Problem, "description": "The API key is missing or not valid"}
}
_TOO_LARGE = TOO_LARGE
_NOT_JSON = NOT_JSON

router = APIRouter(
    prefix="/api/v1/tasks",
    tags=["tasks"],
    responses=_UNAUTHORIZED,
)

_NOT_FOUND: Responses = {
    404: {"model": Problem, "description": "No task has this id, or the id is not a UUID"}
}
_INVALID: Responses = {
    422: {"model": Problem, "description": "The request is invalid; `errors` says where"}
}
_UNAVAILABLE: Responses = {503: {"model": Problem, "description": "The database is unreachable"}}
_WAIT_INVALID: Responses = {
    422: {"model": Problem, "description": "`wait` is negative, not a number, or above the cap"}
}
_WAIT_UNAVAILABLE: Responses = {
    503: {
        "model": Problem,
        "description": "The database is unreachable, or this api process already serves "
        "TASK_WAIT_MAX_WAITERS waiting requests (then with Retry-After)",
    }
}

Wait = Annotated[
    float | None,
    Query(
        ge=0,
        allow_inf_nan=False,
        description="Seconds to wait for the task to finish (DONE, FAILED or CANCELLED); "
        "0 or absent answers at once. At most TASK_WAIT_MAX (60 by default).",
    ),
]


async def _long_poll(
    request: Request, read: waiting.ReadTask, task_id: uuid.UUID, wait: float
) -> Mapping[str, Any]:
    long_poll = waiting.wait_for_outcome(
        request.app.state.task_events, read, task_id, _checked_wait(request, wait)
    )
    return await waiting.unless_disconnected(request.receive, long_poll)


def _checked_wait(request: Request, wait: float) -> float:
    """``wait``, refused above the setting's cap (which a Query bound cannot name)."""
    cap: float = request.app.state.task_wait_max
    if wait > cap:
        raise InvalidRequest.at(
            ["query", "wait"],
            f"Input should be less than or equal to {cap:g} (TASK_WAIT_MAX)",
            "less_than_equal",
        )
    return wait


_TRACEPARENT_DOC = "W3C trace context; a missing or malformed one starts a new trace."
_IDEMPOTENCY_KEY_DOC = (
    "Client-chosen key (printable ASCII, up to 200 characters) that makes retrying this "
    "request safe."
)
_IdempotencyKey = TypeAdapter(
    Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
)


def _idempotency_key(value: str | None) -> str | None:
    """The Idempotency-Key header, checked as FastAPI checks a declared header."""
    if value is None:
        return None
    try:
        return _IdempotencyKey.validate_python(value)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("header", "idempotency-key")} for error in exc.errors()]
        ) from None


def _header_parameter(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An optional header as the OpenAPI document describes one FastAPI declares."""
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {
            "anyOf": [schema, {"type": "null"}],
            "description": description,
            "title": name.title(),
        },
        "description": description,
    }


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Task,
    summary="Create a task",
    description=(
        "Stores the task (status NEW) and the event that will run it in one transaction. "
        "The `Location` header points at the new task. A W3C `traceparent` header is "
        "carried to the consumer, whose log lines for this task show its trace id. "
        "With an `Idempotency-Key` header, repeating the request returns the task it "
        "created (200) instead of creating another; the same key with a different "
        "request is a 409."
    ),
    responses={
        200: {"model": Task, "description": "This Idempotency-Key already created this task"},
        409: {"model": Problem, "description": "The Idempotency-Key was used for another request"},
        **_TOO_LARGE,
        **_NOT_JSON,
        **_INVALID,
        **_UNAVAILABLE,
    },
    openapi_extra={
        "parameters": [
            _header_parameter("traceparent", _TRACEPARENT_DOC, {"type": "string"}),
            _header_parameter(
                "idempotency-key", _IDEMPOTENCY_KEY_DOC, _IdempotencyKey.json_schema()
            ),
        ]
    },
)
async def create_task(body: TaskCreate, request: Request) -> Response:
    # The hot path takes its headers and the service from the request itself: every
    # parameter or dependency FastAPI resolves costs microseconds a request, and with
    # the two headers, the service and the key check as dependencies the api spent
    # ~20% more CPU per create (measured with wrk; see bench/BASELINE.md). The key is
    # checked by api.middleware.ApiKeyGate before the body is read.
    service: TaskService = request.app.state.service
    traceparent = request.headers.get("traceparent")
    idempotency_key = _idempotency_key(request.headers.get("idempotency-key"))
    if idempotency_key is not None:
        row, created = await service.create_once(body, idempotency_key, traceparent)
        location = {"Location": f"{router.prefix}/{row['id']}"}
        return rendering.task_response(row, 201 if created else 200, location)
    row = await service.create(body, traceparent)
    return rendering.task_response(row, 201, {"Location": f"{router.prefix}/{row['id']}"})


@router.post(
    "/batch",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskBatch,
    summary="Create many tasks at once",
    description=(
        f"Up to {MAX_BATCH} tasks, each as `POST /api/v1/tasks` takes it, stored in one "
        "transaction with one wake-up of the relay: all of them or, if any is invalid, "
        "none, with a 422 whose `errors` name every invalid task by its position "
        '(`loc` like `["body", "tasks", 3, "type"]`). Tasks come back in the order '
        "sent. `Idempotency-Key` is not supported here."
    ),
    responses={**_TOO_LARGE, **_NOT_JSON, **_INVALID, **_UNAVAILABLE},
    # The body is read by api.batch (to report every invalid task at once), so the
    # schema FastAPI would derive from a body parameter is declared here instead.
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": rendering.component_schema(TaskBatchCreate)}
            },
        }
    },
)
async def create_batch(
    request: Request,
    service: Service,
    traceparent: Annotated[
        str | None,
        Header(description="W3C trace context, continued by every task of the batch."),
    ] = None,
    idempotency_key: Annotated[
        str | None, Header(include_in_schema=False, description="Refused here.")
    ] = None,
) -> Response:
    if idempotency_key is not None:
        # Ignoring it would let a client believe its retries are safe.
        raise InvalidRequest.at(
            ["header", "idempotency-key"],
            "Idempotency-Key is not supported on /api/v1/tasks/batch; "
            "send the tasks one by one with keys, or retry the batch without one",
            "unsupported",
        )
    rows = await service.create_batch(await request.body(), traceparent)
    return rendering.batch_response(rows)


@router.get(
    "",
    # The document's 200 is either page: a summary page unless the request asked for
    # view=full. The route renders the rows itself (api.rendering).
    response_model=TaskSummaryPage | TaskPage,
    summary="List tasks, newest first",
    description=(
        "Keyset-paginated: pass `next_cursor` back as `cursor` for the next page. Each "
        "item is a summary, the task without its `payload` and `result` "
        "(`GET /api/v1/tasks/{task_id}` has them), so a page stays small whatever the "
        "tasks hold. `view=full` lists whole tasks instead, in pages that end early, "
        "with a `next_cursor`, once their payloads, results and errors would pass "
        "MAX_PAGE_BYTES (1 MiB by default)."
    ),
    responses={
        200: {"description": "A page of summaries; of whole tasks with `view=full`"},
        **_INVALID,
        **_UNAVAILABLE,
    },
)
async def list_tasks(
    service: Service,
    status_: Annotated[
        list[TaskStatus] | None, Query(alias="status", description="Repeat to match several.")
    ] = None,
    type_: Annotated[StorableText | None, Query(alias="type", max_length=200)] = None,
    created_after: Annotated[IsoDatetime | None, Query(description="ISO 8601, exclusive.")] = None,
    created_before: Annotated[IsoDatetime | None, Query(description="ISO 8601, exclusive.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
    ] = None,
    view: Annotated[
        ListView,
        Query(
            description="`summary`: tasks without payload and result. `full`: whole tasks, "
            "at most MAX_PAGE_BYTES of them a page."
        ),
    ] = "summary",
) -> Response:
    listing = await service.list(
        statuses=status_,
        type=type_,
        created_after=created_after,
        created_before=created_before,
        limit=limit,
        cursor=cursor,
        view=view,
    )
    return rendering.page_response(listing.rows, listing.next_cursor, full=listing.full)


@router.get(
    "/{task_id:uuid}",
    response_model=Task,
    summary="Get a task",
    description=(
        "With `wait` (seconds), the answer comes as soon as the task is DONE, FAILED or "
        "CANCELLED, or when the wait is over with the task as it is then. The wait may be "
        "at most TASK_WAIT_MAX (60 s by default)."
    ),
    responses={**_NOT_FOUND, **_WAIT_INVALID, **_WAIT_UNAVAILABLE},
)
async def get_task(
    task_id: uuid.UUID, service: Service, request: Request, wait: Wait = None
) -> Response:
    if wait:
        row = await _long_poll(request, service.get, task_id, wait)
        return rendering.task_response(row)
    return rendering.task_response(await service.get(task_id))


@router.get(
    "/{task_id:uuid}/status",
    response_model=TaskStatusView,
    summary="Get just a task's status",
    description="`wait` as for `GET /api/v1/tasks/{task_id}`.",
    responses={**_NOT_FOUND, **_WAIT_INVALID, **_WAIT_UNAVAILABLE},
)
async def get_task_status(
    task_id: uuid.UUID, service: Service, request: Request, wait: Wait = None
) -> Response:
    if wait:
        row = await _long_poll(request, service.status, task_id, wait)
        return rendering.status_response(row)
    return rendering.status_response(await service.status(task_id))


@router.delete(
    "/{task_id:uuid}",
    response_model=Task,
    summary="Cancel a task",
    description=(
        "NEW or PENDING tasks become CANCELLED at once (200). A PROCESSING task is flagged "
        "`cancel_requested` (202) and its consumer cancels it within a heartbeat. "
        "DONE, FAILED and CANCELLED tasks answer 409."
    ),
    responses={
        202: {"model": Task, "description": "Running: cancellation requested"},
        409: {"model": Problem, "description": "The task already finished"},
        **_NOT_FOUND,
        **_UNAVAILABLE,
    },
)
async def cancel_task(task_id: uuid.UUID, service: Service) -> Response:
    cancellation = await service.cancel(task_id)
    code = status.HTTP_200_OK if cancellation.immediate else status.HTTP_202_ACCEPTED
    return rendering.task_response(cancellation.task, code)
