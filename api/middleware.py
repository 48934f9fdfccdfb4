"""ASGI middleware of the API."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import problem

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


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
