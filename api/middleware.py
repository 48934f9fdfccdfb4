"""ASGI middleware of the API."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

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
