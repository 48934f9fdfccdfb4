"""The FastAPI application factory."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from taskbox.api import errors
from taskbox.api.auth import BEARER, key_bytes, named_keys
from taskbox.api.errors import PROBLEM_JSON, REQUEST_ID_HEADER
from taskbox.api.metrics import ApiMetrics
from taskbox.api.middleware import ApiKeyGate, ContentLengthLimit, JsonBodiesOnly, RequestIds
from taskbox.api.notifier import OutboxNotifier
from taskbox.api.routes import (
    docs,
    events,
    health,
    metrics,
    queues,
    schedules,
    task_actions,
    tasks,
    webhooks,
)
from taskbox.api.schedules import ScheduleService
from taskbox.api.service import PostgresTaskStore, TaskService
from taskbox.api.settings import ApiSettings
from taskbox.api.task_events import TaskEventHub
from taskbox.api.waiting import StreamLimits
from taskbox.api.webhooks import WebhookService
from taskbox.db.pool import create_pool
from taskbox.runtime.telemetry import OFF, Tracing
from taskbox.tasktypes import load_registry

log = logging.getLogger(__name__)

DESCRIPTION = """
Create tasks over REST; Taskbox runs them through a transactional outbox, RabbitMQ and
its consumers. Request bodies are JSON and must be sent as `application/json` (or a
`+json` type); any other Content-Type, or none, is a 415. Every error is an RFC 9457
problem document. Every response carries an
`X-Request-ID` header (the client's own, when well formed), which problem documents
repeat as `request_id` and the server's log lines for the request carry.
"""


def create_app(settings: ApiSettings | None = None, tracing: Tracing = OFF) -> FastAPI:
    """The api's application; ``tracing`` (runtime.telemetry) is flushed when it stops."""
    settings = settings or ApiSettings()
    registry = load_registry(settings.task_modules, builtin_types=settings.builtin_task_types)
    api_metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # min_size=0: the API starts (and answers 503) even while Postgres is down.
        pool = await create_pool(settings, min_size=0)
        notifier = OutboxNotifier(
            pool, settings.outbox_channel, settings.outbox_notify_min_interval
        )
        app.state.pool = pool
        store = PostgresTaskStore(pool)
        app.state.service = TaskService(
            store,
            registry,
            default_max_attempts=settings.default_max_attempts,
            max_max_attempts=settings.max_max_attempts,
            wake_relay=notifier.wake,
            metrics=api_metrics,
            max_payload_string=settings.max_payload_string,
            max_schedule_delay=settings.max_schedule_delay,
            max_page_bytes=settings.max_page_bytes,
            tracer=tracing.tracer,
            callback_destinations=settings.allow_list,
            callback_secret_set=settings.webhook_callback_secret is not None,
        )
        if app.state.api_key_names:
            # The names, never the keys: a key written name:key is checked as its part
            # after the colon, which this line makes visible at once.
            names = ", ".join(name for name, _ in app.state.api_key_names)
            log.info("API keys accepted, by name: %s", names)
        app.state.schedules = ScheduleService(pool, app.state.service, notifier.wake)
        app.state.webhooks = WebhookService(
            pool, registry, settings.allow_list, settings.webhook_rotation_grace
        )
        task_events = TaskEventHub(
            settings,
            max_subscribers=settings.task_wait_max_waiters,
            check_interval=settings.task_events_check_interval,
        )
        task_events.start()
        app.state.task_events = task_events
        if not app.state.api_keys:
            log.warning(
                "API_KEYS is empty: the API is UNAUTHENTICATED; anyone who can reach it "
                "can create, read and cancel tasks. Set API_KEYS to require a key."
            )
        log.info("api ready; task types: %s", ", ".join(registry.names()))
        try:
            yield
        finally:
            await task_events.close()
            await store.close()
            await notifier.close()
            await pool.close()
            tracing.shutdown()

    app = FastAPI(
        title="Taskbox",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Every path is exact. Starlette would answer `/metrics/` with a redirect to
        # `/metrics` on the host the request's Host header names (an open redirect);
        # a trailing slash is an unknown path instead (api.errors: 404).
        redirect_slashes=False,
        # FastAPI's /docs and /redoc load their scripts from a CDN; api.routes.docs
        # serves Swagger UI from the api itself, and ReDoc not at all. The bearer key
        # needs no OAuth2 redirect page.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        # FastAPI counts every body's bytes as they arrive (streamed ones too) and
        # raises a 413 that api.errors answers as a problem document.
        max_body_size=settings.max_body_bytes,
        # FastAPI's own OpenTelemetry instrumentation makes the request's server span
        # (continuing the caller's traceparent) when tracing is on; off, it is told so
        # and checks no provider per request. Only that span: operation spans
        # (dependencies, serialization) would add several spans a request to the
        # benchmarked create, and metrics and logs have their own paths here
        # (Prometheus, runtime.logs); its validation-failure logs would carry bodies.
        telemetry={
            "tracing": tracing.enabled,
            "tracer_provider": tracing.provider,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
            "exclude": _unobserved,
        },
    )
    app.state.api_keys = key_bytes(settings)
    app.state.api_key_names = named_keys(settings)
    app.state.outbox_channel = settings.outbox_channel  # a resume wakes the relays on it
    app.state.metrics_require_auth = settings.metrics_require_auth
    app.state.task_wait_max = settings.task_wait_max
    app.state.task_wait_limits = StreamLimits(
        heartbeat=settings.task_events_heartbeat, max_stream=settings.task_events_max_stream
    )
    errors.install(app)
    app.include_router(tasks.router)
    app.include_router(events.router)
    app.include_router(task_actions.bulk_router)
    app.include_router(task_actions.router)
    app.include_router(queues.router)
    app.include_router(schedules.router)
    app.include_router(webhooks.router)
    app.include_router(webhooks.deliveries_router)
    app.include_router(webhooks.task_deliveries_router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(docs.router)
    app.state.metrics = api_metrics
    _document_responses(app, settings.task_wait_max)
    _gate_before_the_app(app, settings.max_body_bytes)
    return app


# Probes and scrapes: a span every few seconds per prober, in nobody's trace.
_UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _unobserved(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in _UNTRACED_PATHS


def _gate_before_the_app(app: FastAPI, max_body_bytes: int) -> None:
    """Put the request id, the API key gate, the media type check and the declared
    length check outside the whole stack, FastAPI's body limit included, in that order.

    A user middleware would sit inside FastAPI's limit, which replaces any answer to
    a request declaring too long a body with its own plain-text 413. The id comes
    first so that every answer, the gates' own included, carries it; the key gate
    comes next so that a stranger hears 401 whatever their request looks like; then a
    body that is not JSON is a 415 whatever its size.
    """
    build = app.build_middleware_stack
    keys = app.state.api_keys

    def build_middleware_stack() -> Any:
        return RequestIds(
            ApiKeyGate(JsonBodiesOnly(ContentLengthLimit(build(), max_body_bytes)), keys)
        )

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]


_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_BAD_BODY = {
    "description": "The body could not be read as JSON text: it is not UTF-8, or it nests "
    "deeper or holds a longer integer than the parser reads",
    "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}},
}
_REQUEST_ID_RESPONSE_HEADER = {
    "description": "The request's id: the client's own `X-Request-ID` if well formed "
    "(1-128 of `A-Z a-z 0-9 . _ : / + = -`), else a new one.",
    "required": True,
    "schema": {"type": "string"},
}


def _document_responses(app: FastAPI, wait_cap: float | None = None) -> None:
    """Document what the route declarations cannot say.

    - Error bodies under the media type they are sent with: FastAPI files every
      response model under application/json; ours are problem documents, sent as
      application/problem+json (api.errors), and generated clients should look for
      exactly that.
    - The 400 answered for a body that cannot be read as JSON text at all, on every
      operation that takes one: FastAPI's own for a body parameter, ``api.batch``'s
      (the same status and detail) for the batch, which reads its body itself.
    - No 422 where none can happen (``_never_invalid``): FastAPI lists one on every
      operation that takes a parameter, though a task id that is no UUID never reaches
      its validation (the path does not match; api.errors answers 404).
    - The API key on every operation under /api/: ``api.middleware.ApiKeyGate``
      enforces it there, with no route dependency to derive the declaration from.
    - ``wait``'s maximum, TASK_WAIT_MAX (``wait_cap``), which is a setting.
    - The ``X-Request-ID`` header of every response (api.middleware). The request
      header of the same name is described in the document's description rather than
      added to every operation's parameters.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        paths = schema.get("paths", {})
        for operations in paths.values():
            for operation in operations.values():
                if _never_invalid(operation):
                    operation.get("responses", {}).pop("422", None)
        _drop_unused_validation_schemas(schema)
        _declare_api_key(schema)
        if wait_cap is not None:
            _declare_wait_cap(schema, wait_cap)
        for operations in paths.values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "requestBody" in operation:
                    responses.setdefault("400", {**_BAD_BODY})
                for response in responses.values():
                    response.setdefault("headers", {})[REQUEST_ID_HEADER] = (
                        _REQUEST_ID_RESPONSE_HEADER
                    )
                    content = response.get("content", {})
                    ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
                    if ref.endswith("/Problem"):
                        content[PROBLEM_JSON] = content.pop("application/json")
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_api_key(schema: dict[str, Any]) -> None:
    scheme = BEARER.model.model_dump(mode="json", by_alias=True, exclude_none=True)
    schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER.scheme_name] = (
        scheme
    )
    for path, operations in schema.get("paths", {}).items():
        if path.startswith("/api/"):
            for operation in operations.values():
                operation["security"] = [{BEARER.scheme_name: []}]


def _declare_wait_cap(schema: dict[str, Any], cap: float) -> None:
    """Give ``wait`` its maximum: TASK_WAIT_MAX is a setting, which the route's
    declaration (made once, at import) cannot know; clients and the fuzzer read the
    bound of the api they talk to from its document."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "query" and parameter.get("name") == "wait":
                    for option in parameter["schema"].get("anyOf", [parameter["schema"]]):
                        if option.get("type") == "number":
                            option["maximum"] = cap


def _never_invalid(operation: dict[str, Any]) -> bool:
    """No body, and no parameter but path ids documented as UUIDs.

    Every id in this API's paths is read by a ``{name:uuid}`` converter: a path whose
    id is not a UUID reaches no route (api.errors answers 404), so such an operation
    never gets to FastAPI's validation. Read from the document rather than FastAPI's
    route internals, which move between releases; an operation that gains a query or
    header parameter or a body keeps its 422.
    """
    if "requestBody" in operation:
        return False
    return all(
        parameter.get("in") == "path" and parameter.get("schema", {}).get("format") == "uuid"
        for parameter in operation.get("parameters", [])
    )


def _drop_unused_validation_schemas(schema: dict[str, Any]) -> None:
    """Drop FastAPI's 422 body schema (and the item schema only it uses) once no
    operation refers to it: FastAPI adds them with the 422s ``_never_invalid`` removes,
    and every 422 this API documents is a Problem.
    """
    outside_components = {key: value for key, value in schema.items() if key != "components"}
    if '"#/components/schemas/HTTPValidationError"' not in json.dumps(outside_components):
        components = schema.get("components", {}).get("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
