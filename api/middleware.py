"""ASGI middleware of the API.

All of it is plain ASGI, not ``BaseHTTPMiddleware``: each layer is a function call and
a header scan per request, which the benchmarked ingest path can afford.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskbox.api.auth import CHALLENGE, bearer_token, refusal
from taskbox.api.errors import REQUEST_ID_HEADER, problem, route_path
from taskbox.runtime.logs import bind_request_id, unbind

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# How much of a refused request's body is read (and thrown away) before the answer.
# A server that answers and closes while the client still sends leaves unread bytes
# in its socket, and the kernel then resets the connection: the client (urllib, most
# HTTP libraries) reports a broken pipe or a reset instead of the answer. Reading the
# rest first lets the client finish sending and read the problem document. Bounded,
# because the request is refused: a stranger may not make the api read without end
# (API_BODY_TIMEOUT bounds the time, this the bytes); past it the connection is closed
# as before. A few MiB cover the usual mistake, a file a little too large.
DISCARD_LIMIT = 8 * 1024 * 1024
# And for how long: a stranger trickling a body to a refusal would otherwise hold one of
# the api's connections until API_BODY_TIMEOUT. A client sending at any usable speed
# finishes a body within the limit well inside it; one that does not is answered and
# closed as before.
DISCARD_SECONDS = 2.0
_CURL_HINT = "with curl: --json '{...}', or -H 'Content-Type: application/json' -d '{...}'"


def json_media_type_refusal(content_type: bytes | None) -> str | None:
    """Why a body declared ``content_type`` is refused, or None for a JSON one.

    JSON is ``application/json`` or any ``application/<subtype>+json`` (RFC 6839),
    parameters such as ``charset`` aside, case-insensitively. Everything else is
    refused, a missing Content-Type included: a web page can send form-encoded,
    multipart, text/plain and untyped bodies to any origin without a CORS preflight,
    and only those.
    """
    if content_type is None or not content_type.strip():
        return f"the request body has no Content-Type; send it as application/json ({_CURL_HINT})"
    media_type = content_type.split(b";", 1)[0].strip().lower()
    kind, _, subtype = media_type.partition(b"/")
    if kind == b"application" and (subtype == b"json" or subtype.endswith(b"+json")):
        return None
    shown = media_type[:100].decode("latin-1")
    return (
        f"the request body must be JSON, sent as application/json (or a +json type), "
        f"not {shown!r} ({_CURL_HINT})"
    )


class JsonBodiesOnly:
    """Answer a request whose body is not declared JSON with a 415, body unparsed.

    Every body this API accepts is JSON. It once read form-encoded and untyped bodies as
    JSON too, for ``curl -d``'s sake, which let any web page create tasks on an api
    without keys: a browser sends such a body cross-origin without asking first. Only a
    POST, PUT or PATCH that carries a body is checked (a declared length above zero, or
    chunked): with no body there is nothing to type, and the request fails, or is
    answered, on its own merits (a 422 for the missing body, a 405 for the method).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _BODY_METHODS and _has_body(scope):
            detail = json_media_type_refusal(_header(scope, b"content-type"))
            if detail is not None:
                response = problem(Request(scope), 415, detail)
                await answer_unread(response, scope, receive, send)
                return
        await self.app(scope, receive, send)


async def answer_unread(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    """Send ``response`` to a request refused from its head, after discarding up to
    :data:`DISCARD_LIMIT` bytes of its body for at most :data:`DISCARD_SECONDS` (see
    there why), so that the client reads
    the answer rather than a reset. A body still arriving past the limit is left
    unread: the server then closes the connection after the answer."""
    if scope["method"] in _BODY_METHODS and _has_body(scope):
        declared = _content_length(scope)
        if declared is None or declared <= DISCARD_LIMIT:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DISCARD_SECONDS):
                    await _discard_body(receive, DISCARD_LIMIT)
    await response(scope, receive, send)


async def _discard_body(receive: Receive, limit: int) -> None:
    discarded = 0
    while discarded <= limit:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return
        discarded += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _has_body(scope: Scope) -> bool:
    if _header(scope, b"transfer-encoding") is not None:
        return True
    length = _header(scope, b"content-length")
    if length is None:
        return False
    try:
        return int(length) > 0
    except ValueError:  # the server refuses these; a body for all this gate knows
        return True


class ContentLengthLimit:
    """Answer a declared ``Content-Length`` past the limit with a 413 at once.

    FastAPI's own limit (``FastAPI(max_body_size=...)``) counts the bytes of every body
    as they arrive, streamed or not, and its 413 passes through our exception handlers
    as a problem document. A body whose declared length is already too large, though,
    it turns away with a plain-text 413 once the app reads it or answers; this gate sits
    outside it, refuses such a request before any of the app runs, and answers in the
    problem shape once it has discarded the body (``answer_unread``).
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
                await answer_unread(response, scope, receive, send)
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
    from its headers, the body discarded unparsed (``answer_unread``), and is the only
    check the task routes have: every
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
                await answer_unread(response, scope, receive, send)
                return
        await self.app(scope, receive, send)


def _authorization(scope: Scope) -> str | None:
    value = _header(scope, b"authorization")
    # latin-1, as Starlette decodes headers for the dependency
    return value.decode("latin-1") if value is not None else None
