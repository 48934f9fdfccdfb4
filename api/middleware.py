"""ASGI middleware of the API.

All of it is plain ASGI, not ``BaseHTTPMiddleware``: each layer is a function call and
a header scan per request, which the benchmarked ingest path can afford.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import CHALLENGE, bearer_token, refusal
from api.errors import REQUEST_ID_HEADER, problem, route_path
from runtime.logs import bind_request_id, unbind

_JSON = (b"content-type", b"application/json")
# What `curl -d` sends when no -H is given; this API takes no forms, so the body is JSON.
_READ_AS_JSON = {b"application/x-www-form-urlencoded", b""}


class JsonBodies:
    """Treat bodies sent without a JSON content type as JSON.

    Every body this API accepts is JSON; rejecting ``curl -d '{...}'`` for its default
    form content type would be pedantry at the user's expense.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            declared = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if declared.split(b";", 1)[0].strip().lower() in _READ_AS_JSON:
                scope = dict(scope, headers=[*headers, _JSON])
        await self.app(scope, receive, send)


class ContentLengthLimit:
    """Answer a declared ``Content-Length`` past the limit with a 413 at once.

    FastAPI's own limit (``FastAPI(max_body_size=...)``) counts the bytes of every body
    as they arrive, streamed or not, and its 413 passes through our exception handlers
    as a problem document. A body whose declared length is already too large, though,
    it turns away with a plain-text 413 once the app reads it or answers; this gate sits
    outside it, refuses such a request before any of the app runs, body unread, and
    answers in the problem shape.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                response = problem(
                    Request(scope),
                    413,
                    f"the request body ({declared} bytes) exceeds the limit of "
                    f"{self.max_body_bytes} bytes",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lowercase, as ASGI servers give names)."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# A client's own id is kept when it is short and made of characters that are safe in a
# log line, a header and a JSON string; anything else is replaced, never echoed.
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()


class RequestIds:
    """Give every request an id: the client's ``X-Request-ID`` if well formed, else a
    new one. It is answered in the same header, put on the request's log lines, and
    kept in ``scope["state"]["request_id"]`` for problem documents (``api.errors``).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _client_request_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        header = (_REQUEST_ID_KEY, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = bind_request_id(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            unbind(token)


def _client_request_id(scope: Scope) -> str | None:
    value = _header(scope, _REQUEST_ID_KEY)
    return value.decode() if value is not None and _CLIENT_REQUEST_ID.fullmatch(value) else None


class ApiKeyGate:
    """Refuse an ``/api/`` request without a valid key before any of the app runs.

    FastAPI reads and validates a body before it runs the route's dependencies, so the
    auth dependency alone answered a stranger's malformed POST with a 422 and made the
    server parse bodies it was going to refuse. The gate answers such a request 401
    from its headers, body unread, and is the only check the task routes have: every
    route under /api/ is behind it (``api.auth``).
    """

    def __init__(self, app: ASGIApp, keys: Sequence[bytes]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys and scope["type"] == "http" and route_path(scope).startswith("/api/"):
            detail = refusal(bearer_token(_authorization(scope)), self.keys)
            if detail is not None:
                response = problem(Request(scope), 401, detail, headers=CHALLENGE)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _authorization(scope: Scope) -> str | None:
    value = _header(scope, b"authorization")
    # latin-1, as Starlette decodes headers for the dependency
    return value.decode("latin-1") if value is not None else None
