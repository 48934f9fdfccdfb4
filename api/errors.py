"""One error shape for every 4xx/5xx of the task API: RFC 9457 problem details.

(The probes answer in their own small shape, which is what probes read.)

Nothing internal leaves the server: unexpected errors are logged with their traceback
and answered with a generic 500; a database that cannot be reached is a 503. Every
problem carries the request's ``request_id`` (``api.middleware.RequestIds``), the key
to the server's log lines about it.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from taskbox.api.batch import UnreadableBody
from taskbox.api.schedules import ReadOnlySchedule, ScheduleExists, ScheduleNotFound
from taskbox.api.service import IdempotencyConflict, InvalidRequest, TaskFinished, TaskNotFound
from taskbox.api.task_events import TooManyWaiters
from taskbox.api.waiting import ClientGone
from taskbox.api.webhooks import DeliveryNotFound, NotReplayable, WebhookNotFound
from taskbox.db.errors import TRANSIENT_DB_ERRORS

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TASK_PATH = "/api/v1/tasks/"
REQUEST_ID_HEADER = "X-Request-ID"


def request_id(request: Request) -> str | None:
    """The id ``api.middleware.RequestIds`` gave this request (None outside it)."""
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def route_path(scope: Scope) -> str:
    """The path the app routes on. Behind a proxy that mounts the api under a prefix
    (uvicorn --root-path), the ASGI path carries the prefix and Starlette routes on
    what follows it; whatever decides by path (the key gate, the 404 that says task ids
    are UUIDs) must look at the same path, or a prefixed request would slip past it."""
    # Exactly Starlette's reading (starlette._utils.get_route_path, private): the prefix
    # counts only up to a "/", so "/api/v1/tasks" under root_path "/api/v1/task" is
    # routed as itself, and gated as itself.
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _renderable(value: Any) -> Any:
    """``value`` with each lone surrogate in its strings written as its escape.

    A 422 may point at the client's own text: a payload key "\\ud800" is the location
    ``["body", "payload", "\\ud800"]``. UTF-8 has no form for that character, so the
    problem document could not be encoded (a 500 in place of the 422). The escape is
    what the client wrote in its JSON: six plain characters any parser reads.
    """
    if isinstance(value, str):
        if _LONE_SURROGATE.search(value) is None:
            return value
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list | tuple):
        return [_renderable(item) for item in value]
    if isinstance(value, dict):
        return {_renderable(key): _renderable(item) for key, item in value.items()}
    return value


def problem(
    request: Request,
    status: int,
    detail: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "request_id": request_id(request),
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(
        _renderable(body), status_code=status, media_type=PROBLEM_JSON, headers=headers
    )


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Drop pydantic's echo of the input and its docs URL: the location and message say it.
    return [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]


def _summary(errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request, routes: list[BaseRoute]) -> str:
    """Every method served at the request's path, for a 405's ``Allow``.

    FastAPI makes one route per operation, and Starlette's 405 names only the methods of
    the first route whose path matched: ``Allow: POST`` for /api/v1/tasks, which serves
    GET too. RFC 9110 asks for the full list. Routes are asked whether they would take
    the request under each method, since included routers nest them (a 405 is rare
    enough for the few extra matches).
    """
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed)


def install(app: FastAPI) -> None:
    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return problem(request, 422, str(exc), exc.errors)

    @app.exception_handler(UnreadableBody)
    async def _unreadable(request: Request, exc: UnreadableBody) -> JSONResponse:
        # The 400 FastAPI raises for a single create's unreadable body, for a batch's.
        return problem(request, 400, str(exc))

    @app.exception_handler(TaskNotFound)
    async def _not_found(request: Request, exc: TaskNotFound) -> JSONResponse:
        return problem(request, 404, str(exc.args[0]))

    @app.exception_handler(IdempotencyConflict)
    async def _reused_key(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        return problem(request, 409, str(exc))

    @app.exception_handler(ScheduleNotFound)
    async def _no_schedule(request: Request, exc: ScheduleNotFound) -> JSONResponse:
        return problem(request, 404, str(exc.args[0]))

    @app.exception_handler(ScheduleExists)
    async def _schedule_exists(request: Request, exc: ScheduleExists) -> JSONResponse:
        return problem(request, 409, str(exc))

    @app.exception_handler(ReadOnlySchedule)
    async def _read_only(request: Request, exc: ReadOnlySchedule) -> JSONResponse:
        return problem(request, 409, str(exc))

    @app.exception_handler(WebhookNotFound)
    @app.exception_handler(DeliveryNotFound)
    async def _no_webhook(request: Request, exc: LookupError) -> JSONResponse:
        return problem(request, 404, str(exc.args[0]))

    @app.exception_handler(NotReplayable)
    async def _not_replayable(request: Request, exc: NotReplayable) -> JSONResponse:
        return problem(request, 409, str(exc))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        # Nobody is left to read it; uvicorn drops it. 499 as nginx logs such requests.
        return Response(status_code=499)

    @app.exception_handler(TooManyWaiters)
    async def _too_many_waiters(request: Request, exc: TooManyWaiters) -> JSONResponse:
        return problem(request, 503, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(TaskFinished)
    async def _finished(request: Request, exc: TaskFinished) -> JSONResponse:
        return problem(request, 409, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _field_errors(exc)
        return problem(request, 422, _summary(errors), errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request, app.router.routes)
        path = route_path(request.scope)
        if exc.status_code == 404 and len(path) > 1 and path.endswith("/"):
            # No redirect to the path without it (api.app: redirect_slashes=False).
            detail = "no route has this path: this API's paths never end with a trailing slash"
        elif exc.status_code == 404 and path.startswith(TASK_PATH):
            # Task routes match only UUIDs, so a task path that reached no route names
            # no task; say so rather than a bare "Not Found".
            name = path.removeprefix(TASK_PATH).split("/", 1)[0]
            detail = f"no task has the id {name[:64]!r}: task ids are UUIDs"
        return problem(request, exc.status_code, detail, headers=headers or None)

    for error in TRANSIENT_DB_ERRORS:

        @app.exception_handler(error)
        async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
            log.warning(
                "database unavailable: %s: %s",
                type(exc).__name__,
                exc,
                extra={"request_id": request_id(request)},
            )
            return problem(
                request,
                503,
                "the task store is unavailable; retry shortly",
                headers={"Retry-After": "1"},
            )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unhandled error on %s %s",
            request.method,
            request.url.path,
            exc_info=exc,
            extra={"request_id": request_id(request)},
        )
        return problem(request, 500, "internal error; it has been logged")
