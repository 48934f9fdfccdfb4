"""Authentication and request limits of the REST API, in-process, over the real Postgres.

API keys (``API_KEYS``, ``METRICS_REQUIRE_AUTH``), the request body limit
(``MAX_BODY_BYTES``) and the payload string limit (``MAX_PAYLOAD_STRING``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from taskbox.api.app import create_app
from taskbox.api.middleware import DISCARD_LIMIT
from taskbox.api.settings import ApiSettings
from tests.integration.conftest import app_client_for
from tests.integration.test_api_tasks import (
    TASKS,
    assert_field_errors,
    assert_problem,
    row_counts,
)

KEY_ONE = "key-one-3f9a"
KEY_TWO = "key-two-c41e"
LIMIT = 1024  # MAX_BODY_BYTES of the limited client
STRING_LIMIT = 10  # MAX_PAYLOAD_STRING of the limited client


def settings_with(api_settings: ApiSettings, **changes: Any) -> ApiSettings:
    return ApiSettings(
        database_url=api_settings.database_url,
        outbox_channel=api_settings.outbox_channel,
        **changes,
    )


JSON = {"Content-Type": "application/json"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def keyed(api_settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app with two API keys configured (a rotation in progress)."""
    settings = settings_with(api_settings, api_keys=f"{KEY_ONE},{KEY_TWO}")
    async with app_client_for(settings) as client:
        yield client


@pytest.fixture
async def limited(api_settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app with small body and payload string limits."""
    settings = settings_with(api_settings, max_body_bytes=LIMIT, max_payload_string=STRING_LIMIT)
    async with app_client_for(settings) as client:
        yield client


def assert_unauthorized(response: httpx.Response) -> dict[str, Any]:
    body = assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    return body


# Every /api/v1 operation, with a path that would otherwise answer (or 404).
ROUTES = [
    ("POST", TASKS, {"type": "echo", "payload": {}}),
    ("POST", f"{TASKS}/batch", {"tasks": [{"type": "echo"}]}),
    ("GET", TASKS, None),
    ("GET", f"{TASKS}/{uuid.UUID(int=1)}", None),
    ("GET", f"{TASKS}/{uuid.UUID(int=1)}/status", None),
    ("DELETE", f"{TASKS}/{uuid.UUID(int=1)}", None),
    ("POST", f"{TASKS}/cancel", {"type": "echo", "reason": "x"}),
    ("POST", f"{TASKS}/retry", {"type": "echo", "reason": "x"}),
    ("GET", "/api/v1/task-actions", None),
    ("GET", "/api/v1/task-actions/1", None),
    ("GET", f"{TASKS}/{uuid.UUID(int=1)}/events", None),
    ("GET", f"{TASKS}/events", None),
    ("GET", "/api/v1/queues", None),
    ("GET", "/api/v1/queues/media", None),
    ("POST", "/api/v1/queues/media/pause", {"reason": "x"}),
    ("POST", "/api/v1/queues/media/resume", {"reason": "x"}),
    ("GET", "/api/v1/schedules", None),
    ("POST", "/api/v1/schedules", {"name": "n", "type": "echo", "interval_seconds": 60}),
    ("GET", "/api/v1/schedules/n", None),
    ("PATCH", "/api/v1/schedules/n", {"paused": True}),
    ("DELETE", "/api/v1/schedules/n", None),
    ("POST", "/api/v1/schedules/n/pause", None),
    ("POST", "/api/v1/schedules/n/resume", None),
    ("POST", "/api/v1/schedules/n/run", None),
    ("GET", "/api/v1/webhooks", None),
    ("POST", "/api/v1/webhooks", {"url": "https://93.184.215.14/", "events": ["task.done"]}),
    ("GET", f"/api/v1/webhooks/{uuid.UUID(int=1)}", None),
    ("PATCH", f"/api/v1/webhooks/{uuid.UUID(int=1)}", {"enabled": False}),
    ("DELETE", f"/api/v1/webhooks/{uuid.UUID(int=1)}", None),
    ("POST", f"/api/v1/webhooks/{uuid.UUID(int=1)}/rotate-secret", None),
    ("GET", f"/api/v1/webhooks/{uuid.UUID(int=1)}/deliveries", None),
    ("POST", f"/api/v1/webhooks/{uuid.UUID(int=1)}/replay-failed", None),
    ("GET", f"/api/v1/webhook-deliveries/{uuid.UUID(int=1)}", None),
    ("POST", f"/api/v1/webhook-deliveries/{uuid.UUID(int=1)}/replay", None),
    ("GET", f"{TASKS}/{uuid.UUID(int=1)}/webhook-deliveries", None),
]


# --------------------------------------------------------------------- authentication


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_every_task_route_requires_a_key(
    keyed: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = await keyed.request(method, path, json=body)
    problem = assert_unauthorized(response)
    assert "API key is required" in problem["detail"]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_a_wrong_key_is_refused_on_every_task_route(
    keyed: httpx.AsyncClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = await keyed.request(method, path, json=body, headers=bearer("key-three"))
    problem = assert_unauthorized(response)
    assert problem["detail"] == "the API key is not valid"


@pytest.mark.parametrize(
    "authorization",
    [
        KEY_ONE,  # no scheme
        f"Basic {KEY_ONE}",  # another scheme
        "Bearer",  # no credentials
        "Bearer ",
        f"Bearer {KEY_ONE}x",  # a key with something appended
        f"Bearer {KEY_ONE[:-1]}",  # a prefix of a key
        f"Bearer {KEY_ONE},{KEY_TWO}",  # the setting itself
        "Bearer kéy-one",  # not ASCII
    ],
)
async def test_a_malformed_authorization_header_is_refused(
    keyed: httpx.AsyncClient, pool: asyncpg.Pool, authorization: str
) -> None:
    response = await keyed.post(
        TASKS,
        json={"type": "echo"},
        headers={b"Authorization": authorization.encode()},
    )
    assert_unauthorized(response)
    assert await row_counts(pool) == (0, 0)


@pytest.mark.parametrize("key", [KEY_ONE, KEY_TWO])
async def test_each_configured_key_is_accepted(
    keyed: httpx.AsyncClient, pool: asyncpg.Pool, key: str
) -> None:
    created = await keyed.post(
        TASKS, json={"type": "echo", "payload": {"k": 1}}, headers=bearer(key)
    )
    assert created.status_code == 201, created.text
    task_id = created.json()["id"]
    assert await row_counts(pool) == (1, 1)

    for path in (TASKS, f"{TASKS}/{task_id}", f"{TASKS}/{task_id}/status"):
        response = await keyed.get(path, headers=bearer(key))
        assert response.status_code == 200, (path, response.text)
    cancelled = await keyed.delete(f"{TASKS}/{task_id}", headers=bearer(key))
    assert cancelled.status_code == 200, cancelled.text


async def test_the_scheme_name_is_case_insensitive(keyed: httpx.AsyncClient) -> None:
    response = await keyed.get(TASKS, headers={"Authorization": f"bearer {KEY_TWO}"})
    assert response.status_code == 200, response.text


async def test_a_refused_create_writes_nothing(
    keyed: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    assert_unauthorized(await keyed.post(TASKS, json={"type": "echo"}))
    assert_unauthorized(await keyed.post(TASKS, json={"type": "echo"}, headers=bearer("nope")))
    assert await row_counts(pool) == (0, 0)


# FastAPI parses and validates a body before the route's dependencies run; the key gate
# (api.middleware.ApiKeyGate) answers first, so a stranger learns nothing from a 422.
@pytest.mark.parametrize(
    ("body", "authorization"),
    [
        (b"{not json", None),
        (b'{"type": 5, "unexpected": true}', None),  # parses, fails the schema
        (b'{"type": "\xff"}', None),  # not UTF-8: FastAPI's own 400
        (b"{not json", "Bearer key-three"),
        (b"{not json", "Basic a2V5LW9uZQ=="),
    ],
)
async def test_an_unauthenticated_bad_body_is_a_401_not_a_422(
    keyed: httpx.AsyncClient, pool: asyncpg.Pool, body: bytes, authorization: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    assert_unauthorized(await keyed.post(TASKS, content=body, headers=headers))
    assert await row_counts(pool) == (0, 0)


async def test_with_a_valid_key_a_bad_body_is_still_a_422(keyed: httpx.AsyncClient) -> None:
    response = await keyed.post(TASKS, content=b"{not json", headers={**JSON, **bearer(KEY_ONE)})
    assert_problem(response, 422)


# A refusal reads the body only to throw it away (api.middleware.answer_unread: a client
# still sending when the server closes gets a reset, not the answer); it never reaches
# the app, which is what the 401 for a body that is not JSON shows.
async def test_an_unauthenticated_body_is_discarded_unparsed(keyed: httpx.AsyncClient) -> None:
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for chunk in (b"{not ", b"json"):
            read.append(chunk)
            yield chunk

    assert_unauthorized(await keyed.post(TASKS, content=body(), headers=JSON))
    assert read == [b"{not ", b"json"]


async def test_behind_a_prefix_an_unauthenticated_body_is_still_discarded_unparsed(
    api_settings: ApiSettings,
) -> None:
    # A proxy serving the api under /taskbox (uvicorn --root-path /taskbox): the ASGI
    # path carries the prefix, and the gate must still answer before the body.
    app = create_app(settings_with(api_settings, api_keys=KEY_ONE))
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for chunk in (b"{not json",):
            read.append(chunk)
            yield chunk

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, root_path="/taskbox")
        async with httpx.AsyncClient(transport=transport, base_url="http://test/taskbox") as client:
            assert_unauthorized(await client.post(TASKS, content=body(), headers=JSON))
            assert read == [b"{not json"]
            # The prefix is really in use: with the key, the route answers.
            response = await client.post(TASKS, json={"type": "echo"}, headers=bearer(KEY_ONE))
            assert response.status_code == 201, response.text
            missing = await client.get(f"{TASKS}/nope", headers=bearer(KEY_ONE))
            assert_problem(missing, 404)
            assert "task ids are UUIDs" in missing.json()["detail"]


async def test_the_key_is_checked_before_the_declared_length(api_settings: ApiSettings) -> None:
    settings = settings_with(api_settings, api_keys=KEY_ONE, max_body_bytes=LIMIT)
    async with app_client_for(settings) as client:
        too_long = json_body_of_size(LIMIT + 1)
        assert_unauthorized(await client.post(TASKS, content=too_long, headers=JSON))
        authorized = {**JSON, **bearer(KEY_ONE)}
        assert_problem(await client.post(TASKS, content=too_long, headers=authorized), 413)


async def test_unknown_api_paths_ask_for_a_key_before_saying_404(
    keyed: httpx.AsyncClient,
) -> None:
    assert_unauthorized(await keyed.get("/api/v2/anything"))
    assert_problem(await keyed.get("/api/v2/anything", headers=bearer(KEY_ONE)), 404)


# A trailing-slash redirect built its Location from the Host header, so a request saying
# `Host: evil.example` was sent to http://evil.example/... (an open redirect for anyone
# who can get a link or a cached response in front of a user). There are no such
# redirects: every path is exact, and a trailing slash is an unknown path.
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/metrics/"),
        ("GET", "/healthz/"),
        ("GET", f"{TASKS}/"),
        ("POST", f"{TASKS}/"),
        ("GET", f"{TASKS}/{uuid.UUID(int=1)}/"),
        ("GET", "/openapi.json/"),
    ],
)
async def test_a_trailing_slash_is_a_404_never_a_redirect_to_the_host_header(
    keyed: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await keyed.request(
        method,
        path,
        headers={"Host": "evil.example", **bearer(KEY_ONE), **JSON},
        content=b"{}" if method == "POST" else None,
    )
    assert "location" not in response.headers, response.headers
    body = assert_problem(response, 404)
    assert "evil.example" not in response.text
    assert "trailing slash" in body["detail"], body


async def test_without_keys_a_bad_body_is_a_422(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post(TASKS, content=b"{not json", headers=JSON), 422)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_endpoints_stay_open(keyed: httpx.AsyncClient, path: str) -> None:
    response = await keyed.get(path)
    assert response.status_code == 200, response.text


async def test_metrics_are_open_by_default(keyed: httpx.AsyncClient) -> None:
    response = await keyed.get("/metrics")
    assert response.status_code == 200, response.text
    assert "taskbox" in response.text


async def test_metrics_can_require_a_key(api_settings: ApiSettings) -> None:
    settings = settings_with(api_settings, api_keys=KEY_ONE, metrics_require_auth=True)
    async with app_client_for(settings) as client:
        assert_unauthorized(await client.get("/metrics"))
        assert_unauthorized(await client.get("/metrics", headers=bearer(KEY_TWO)))
        response = await client.get("/metrics", headers=bearer(KEY_ONE))
        assert response.status_code == 200, response.text
        assert (await client.get("/healthz")).status_code == 200


async def test_without_keys_the_api_is_open_and_says_so_loudly(
    api_settings: ApiSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskbox.api.app"):
        async with app_client_for(api_settings) as client:
            response = await client.post(TASKS, json={"type": "echo"})
            assert response.status_code == 201, response.text
            # A header, even a wrong one, changes nothing while auth is off.
            listed = await client.get(TASKS, headers=bearer("anything"))
            assert listed.status_code == 200, listed.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("UNAUTHENTICATED" in r.getMessage() for r in warnings), caplog.text


async def test_with_keys_there_is_no_unauthenticated_warning(
    api_settings: ApiSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskbox.api.app"):
        async with app_client_for(settings_with(api_settings, api_keys=KEY_ONE)):
            pass
    assert "UNAUTHENTICATED" not in caplog.text


async def test_openapi_declares_the_bearer_scheme_and_the_401(
    keyed: httpx.AsyncClient,
) -> None:
    response = await keyed.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes == {
        "ApiKey": {
            "type": "http",
            "scheme": "bearer",
            "description": schemes["ApiKey"]["description"],
        }
    }
    operations = [
        (path, method, operation)
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    ]
    task_operations = [op for op in operations if op[0].startswith("/api/v1/")]
    assert len(task_operations) == len(ROUTES)
    for path, method, operation in task_operations:
        assert operation.get("security") == [{"ApiKey": []}], (path, method)
        unauthorized = operation["responses"]["401"]
        assert unauthorized["content"]["application/problem+json"]["schema"] == {
            "$ref": "#/components/schemas/Problem"
        }, (path, method)
    for path, method, operation in operations:
        if not path.startswith("/api/v1/"):
            assert "security" not in operation, (path, method)
            assert "401" not in operation["responses"], (path, method)
    create = schema["paths"][TASKS]["post"]["responses"]
    assert "application/problem+json" in create["413"]["content"]


# ---------------------------------------------------------------------- content type

# A web page can POST to the api from any origin without a CORS preflight when the body
# is form-encoded, multipart, text/plain or untyped, and the api once read such bodies
# as JSON: with API_KEYS empty, any page a user opened could create tasks. A body must
# be declared JSON now, which a browser sends cross-origin only after a preflight that
# this api never grants.
NOT_JSON = [
    "application/x-www-form-urlencoded",  # an HTML form, and `curl -d` without -H
    "application/x-www-form-urlencoded; charset=utf-8",
    "multipart/form-data; boundary=x",
    "text/plain",  # a form with enctype="text/plain", fetch() with a string body
    "text/plain; charset=utf-8",
    "application/xml",
    "application/jsonx",
    "text/json",
    None,  # fetch() with a Blob body, or any client that declares nothing
]
BODIES = [
    (TASKS, b'{"type": "echo", "payload": {"x": 1}}'),
    (f"{TASKS}/batch", b'{"tasks": [{"type": "echo"}]}'),
]


@pytest.mark.parametrize(("path", "body"), BODIES, ids=["create", "batch"])
@pytest.mark.parametrize("content_type", NOT_JSON)
async def test_a_body_not_declared_json_is_a_415_and_creates_nothing(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    path: str,
    body: bytes,
    content_type: str | None,
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}

    response = await client.post(path, content=body, headers=headers)

    assert response.request.headers.get("content-type") == content_type
    problem = assert_problem(response, 415)
    assert "application/json" in problem["detail"]
    if content_type is None:
        assert "no Content-Type" in problem["detail"]
    else:
        assert repr(content_type.split(";")[0]) in problem["detail"]
    assert await row_counts(pool) == (0, 0)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.taskbox+json",
        "application/merge-patch+json; charset=UTF-8",
    ],
)
async def test_json_and_plus_json_bodies_are_accepted(
    client: httpx.AsyncClient, pool: asyncpg.Pool, content_type: str
) -> None:
    for path, body in BODIES:
        response = await client.post(path, content=body, headers={"Content-Type": content_type})
        assert response.status_code == 201, (path, response.text)
    assert await row_counts(pool) == (2, 2)


async def test_a_body_not_declared_json_is_refused_and_discarded_unparsed(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for chunk in (b'{"type": ', b'"echo"}'):
            read.append(chunk)
            yield chunk

    response = await client.post(TASKS, content=body(), headers={"Content-Type": "text/plain"})
    assert_problem(response, 415)
    assert read == [b'{"type": ', b'"echo"}']
    assert await row_counts(pool) == (0, 0)


async def test_the_key_is_checked_before_the_content_type(keyed: httpx.AsyncClient) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert_unauthorized(await keyed.post(TASKS, content=b'{"type": "echo"}', headers=form))
    response = await keyed.post(
        TASKS, content=b'{"type": "echo"}', headers={**form, **bearer(KEY_ONE)}
    )
    assert_problem(response, 415)


async def test_a_post_without_a_body_needs_no_content_type(client: httpx.AsyncClient) -> None:
    # Nothing to read, so nothing to type: the request fails on what is missing.
    assert_field_errors(await client.post(TASKS), [(["body"], "Field required", "missing")])
    assert_problem(await client.post(f"{TASKS}/{uuid.UUID(int=1)}"), 405)


async def test_openapi_documents_the_415_on_the_operations_that_take_a_body(
    client: httpx.AsyncClient,
) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path, methods in paths.items():
        for method, operation in methods.items():
            takes_a_body = "requestBody" in operation
            assert ("415" in operation["responses"]) == takes_a_body, (path, method)
            if takes_a_body:
                assert set(operation["requestBody"]["content"]) == {"application/json"}
                content = operation["responses"]["415"]["content"]
                assert set(content) == {"application/problem+json"}, (path, method)


# ------------------------------------------------------------------------ body limit


def json_body_of_size(size: int) -> bytes:
    """A valid create request of exactly ``size`` bytes."""
    empty = json.dumps({"type": "echo", "payload": {"p": ""}}).encode()
    body = json.dumps({"type": "echo", "payload": {"p": "x" * (size - len(empty))}}).encode()
    assert len(body) == size
    return body


async def test_a_body_at_the_limit_is_accepted(api_settings: ApiSettings) -> None:
    settings = settings_with(api_settings, max_body_bytes=LIMIT)
    async with app_client_for(settings) as client:
        response = await client.post(TASKS, content=json_body_of_size(LIMIT), headers=JSON)
        assert response.status_code == 201, response.text


async def test_a_declared_length_over_the_limit_is_a_413(
    limited: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await limited.post(TASKS, content=json_body_of_size(LIMIT + 1), headers=JSON)
    assert response.request.headers["content-length"] == str(LIMIT + 1)
    problem = assert_problem(response, 413)
    assert str(LIMIT) in problem["detail"]
    assert await row_counts(pool) == (0, 0)


@pytest.mark.parametrize(
    ("declared", "discarded"),
    [(LIMIT + 1, True), (DISCARD_LIMIT + 1, False)],
    ids=["discarded", "past-the-discard-limit"],
)
async def test_a_declared_length_over_the_limit_is_refused_on_the_header(
    limited: httpx.AsyncClient, pool: asyncpg.Pool, declared: int, discarded: bool
) -> None:
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for chunk in (b'{"type": "echo", ', b'"payload": {}}'):
            read.append(chunk)
            yield chunk

    # The header claims more than the limit: refused on the header alone; the body is
    # read to be dropped, unless it claims more than the api ever discards.
    response = await limited.post(
        TASKS, content=body(), headers={**JSON, "Content-Length": str(declared)}
    )
    assert_problem(response, 413)
    assert read == ([b'{"type": "echo", ', b'"payload": {}}'] if discarded else [])
    assert await row_counts(pool) == (0, 0)


async def test_a_chunked_body_over_the_limit_is_a_413(
    limited: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"type": "echo", "payload": {"p": "'
        for _ in range(100):  # 10,000 bytes in all, far past the 1,024 allowed
            yield b"x" * 100
        yield b'"}}'

    response = await limited.post(TASKS, content=body(), headers=JSON)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    problem = assert_problem(response, 413)
    assert problem["instance"] == TASKS
    assert await row_counts(pool) == (0, 0)


async def test_a_chunked_body_under_the_limit_is_accepted(
    limited: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"type": "echo", '
        yield b'"payload": {"p": "ok"}}'

    response = await limited.post(TASKS, content=body(), headers=JSON)
    assert response.status_code == 201, response.text
    assert await row_counts(pool) == (1, 1)


async def test_the_default_body_limit_is_one_mebibyte(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    assert_problem(
        await client.post(TASKS, content=json_body_of_size(1_048_577), headers=JSON), 413
    )
    assert await row_counts(pool) == (0, 0)
    # Just under it, the body is read, then refused for its long string, not its size.
    response = await client.post(TASKS, content=json_body_of_size(1_048_576), headers=JSON)
    assert_problem(response, 422)


# --------------------------------------------------------------- payload string limit


async def test_a_payload_string_at_the_limit_is_accepted(limited: httpx.AsyncClient) -> None:
    response = await limited.post(
        TASKS, json={"type": "echo", "payload": {"a": "x" * STRING_LIMIT}}
    )
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"a": "x" * (STRING_LIMIT + 1)}, ["body", "payload", "a"]),
        ({"a": {"b": ["ok", "y" * (STRING_LIMIT + 1)]}}, ["body", "payload", "a", "b", 1]),
    ],
)
async def test_a_payload_string_over_the_limit_is_a_422_with_its_location(
    limited: httpx.AsyncClient, pool: asyncpg.Pool, payload: dict[str, Any], loc: list[Any]
) -> None:
    response = await limited.post(TASKS, json={"type": "echo", "payload": payload})
    assert_field_errors(
        response, [(loc, f"string longer than {STRING_LIMIT} characters", "unstorable_value")]
    )
    assert await row_counts(pool) == (0, 0)


async def test_a_payload_key_over_the_limit_is_a_422(
    limited: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    payload = {"a": {"k" * (STRING_LIMIT + 1): 1}}
    response = await limited.post(TASKS, json={"type": "echo", "payload": payload})
    assert_field_errors(
        response,
        [
            (
                ["body", "payload", "a"],
                f"a key is longer than {STRING_LIMIT} characters",
                "unstorable_value",
            )
        ],
    )
    assert await row_counts(pool) == (0, 0)


async def test_the_default_payload_string_limit_is_65536_characters(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    ok = await client.post(TASKS, json={"type": "echo", "payload": {"a": "x" * 65_536}})
    assert ok.status_code == 201, ok.text
    too_long = await client.post(TASKS, json={"type": "echo", "payload": {"a": "x" * 65_537}})
    assert_field_errors(
        too_long,
        [(["body", "payload", "a"], "string longer than 65536 characters", "unstorable_value")],
    )
    assert await row_counts(pool) == (1, 1)
