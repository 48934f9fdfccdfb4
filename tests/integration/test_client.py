"""taskbox.client against the real api: in-process over httpx's ASGI transport, and as
real api, relay and consumer processes on a loopback port.

Faults the client must survive (a connection lost after the request went out, a 503
with Retry-After) are made by transports wrapped around the real app's: the request
still reaches the app, only the answer is lost or replaced.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import BaseModel, SecretStr

from taskbox.api.app import create_app
from taskbox.api.settings import ApiSettings
from taskbox.client import (
    AsyncClient,
    Client,
    Conflict,
    InvalidRequest,
    NewTask,
    NotFound,
    RetryPolicy,
    ServiceUnavailable,
    TaskStatus,
    TransportError,
    Unauthorized,
    WaitTimeout,
    models,
)
from tests.integration.processes import ServiceProcess, free_port

# Short pauses so retries cost a test little.
QUICK = RetryPolicy(max_attempts=4, max_elapsed=10.0, backoff=0.01, max_backoff=0.05)


class Recording(httpx.AsyncBaseTransport):
    """Passes every request to the app's transport and keeps (method, path) of each."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.sent: list[tuple[str, str]] = []
        # Replaces the app's answer to the request numbered by its key (0 = first).
        self.faults: dict[int, Callable[[httpx.Request], httpx.Response | None]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        number = len(self.sent)
        self.sent.append((request.method, request.url.path))
        fault = self.faults.get(number)
        if fault is not None:
            answer = fault(request)
            if answer is not None:  # answered without reaching the app
                return answer
        response = await self.inner.handle_async_request(request)
        if fault is not None:
            await response.aread()
            raise httpx.ReadError("connection lost after the request was sent")
        return response


def lose_the_answer(request: httpx.Request) -> None:
    """The request reaches the app; its answer is lost with the connection."""
    return None


def unavailable(request: httpx.Request) -> httpx.Response:
    problem = {"type": "about:blank", "title": "Service Unavailable", "status": 503}
    return httpx.Response(
        503,
        headers={"Retry-After": "1", "Content-Type": "application/problem+json"},
        json={**problem, "detail": "the database is unreachable"},
    )


@asynccontextmanager
async def client_of(
    settings: ApiSettings, retry: RetryPolicy = QUICK, api_key: str | None = None
) -> AsyncIterator[tuple[AsyncClient, Recording]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = Recording(httpx.ASGITransport(app=app, raise_app_exceptions=False))
        async with AsyncClient(
            "http://test", api_key=api_key, retry=retry, transport=transport
        ) as client:
            yield client, transport


@pytest.fixture
async def wired(api_settings: ApiSettings) -> AsyncIterator[tuple[AsyncClient, Recording]]:
    async with client_of(api_settings) as pair:
        yield pair


@pytest.fixture
def taskbox(wired: tuple[AsyncClient, Recording]) -> AsyncClient:
    return wired[0]


async def test_create_get_status_and_cancel(taskbox: AsyncClient) -> None:
    created = await taskbox.create("echo", {"x": 1}, priority=5, max_attempts=2)
    assert isinstance(created, models.Task)
    assert (created.status, created.priority, created.max_attempts) == (TaskStatus.NEW, 5, 2)
    assert created.payload == {"x": 1}

    assert await taskbox.get(created.id) == created
    status = await taskbox.status(str(created.id))
    assert (status.id, status.status) == (created.id, TaskStatus.NEW)

    cancelled = await taskbox.cancel(created.id)
    assert cancelled.status is TaskStatus.CANCELLED
    with pytest.raises(Conflict) as again:
        await taskbox.cancel(created.id)
    assert again.value.status == 409
    assert again.value.problem.instance == f"/api/v1/tasks/{created.id}"


async def test_create_many_and_list_follow_cursors_with_filters(
    wired: tuple[AsyncClient, Recording],
) -> None:
    taskbox, transport = wired
    made = await taskbox.create_many(
        [NewTask(type="echo", payload={"n": n}) for n in range(6)]
        + [{"type": "sha256", "payload": {"text": "hi"}}]
    )
    assert [task.payload for task in made] == [{"n": n} for n in range(6)] + [{"text": "hi"}]
    await taskbox.cancel(made[0].id)
    later = await taskbox.create("echo", {"n": "later"})
    # Newest first: a batch's tasks share their created_at, and the id breaks the tie.
    newest_first = [later, *sorted(made, key=lambda task: task.id.int, reverse=True)]

    transport.sent.clear()
    listed = [task async for task in taskbox.list(page_size=3)]
    assert [task.id for task in listed] == [task.id for task in newest_first]
    assert all(type(task) is models.TaskSummary for task in listed)
    assert transport.sent == [("GET", "/api/v1/tasks")] * 3  # 3 + 3 + 2

    full = [task async for task in taskbox.list(page_size=2, view="full", type="echo")]
    echoes = [task for task in newest_first if task.type == "echo"]
    assert [task.payload for task in full] == [task.payload for task in echoes]
    cancelled = [task.id async for task in taskbox.list(status=[TaskStatus.CANCELLED, "FAILED"])]
    assert cancelled == [made[0].id]
    after = [task.id async for task in taskbox.list(created_after=made[0].created_at)]
    assert after == [later.id]
    before = taskbox.list(created_before=later.created_at, status="CANCELLED", type="echo")
    assert [task.id async for task in before] == [made[0].id]


async def test_unknown_task_raises_not_found_with_the_problem(taskbox: AsyncClient) -> None:
    missing = uuid.uuid4()
    with pytest.raises(NotFound) as raised:
        await taskbox.get(missing)
    assert raised.value.status == 404
    assert raised.value.detail == f"task {missing} does not exist"
    assert raised.value.request_id
    with pytest.raises(NotFound):
        await taskbox.status(missing)


async def test_invalid_task_raises_invalid_request_with_the_problem(taskbox: AsyncClient) -> None:
    with pytest.raises(InvalidRequest) as raised:
        await taskbox.create("no-such-type")
    problem = raised.value.problem
    assert (problem.status, raised.value.status) == (422, 422)
    assert "no-such-type" in problem.detail
    assert problem.errors and problem.errors[0]["loc"] == ["body", "type"]

    with pytest.raises(InvalidRequest) as batch:
        await taskbox.create_many([{"type": "echo"}, {"type": "nope"}])
    assert batch.value.problem.errors
    assert batch.value.problem.errors[0]["loc"] == ["body", "tasks", 1, "type"]
    assert [task async for task in taskbox.list()] == []


async def test_create_whose_answer_was_lost_is_retried_into_one_task(
    wired: tuple[AsyncClient, Recording],
) -> None:
    taskbox, transport = wired
    transport.faults[0] = lose_the_answer
    created = await taskbox.create("echo", {"once": True})
    assert transport.sent == [("POST", "/api/v1/tasks")] * 2
    assert [task.id async for task in taskbox.list()] == [created.id]


async def test_batch_whose_answer_was_lost_is_not_sent_again(
    wired: tuple[AsyncClient, Recording],
) -> None:
    taskbox, transport = wired
    transport.faults[0] = lose_the_answer
    with pytest.raises(TransportError, match="not safe to repeat"):
        await taskbox.create_many([{"type": "echo"}, {"type": "echo"}])
    assert transport.sent == [("POST", "/api/v1/tasks/batch")]
    assert len([task async for task in taskbox.list()]) == 2


async def test_503_is_retried_after_its_retry_after(wired: tuple[AsyncClient, Recording]) -> None:
    taskbox, transport = wired
    transport.faults[0] = unavailable
    started = time.monotonic()
    created = await taskbox.create("echo")
    assert time.monotonic() - started >= 1.0  # Retry-After: 1
    assert transport.sent == [("POST", "/api/v1/tasks")] * 2
    assert [task.id async for task in taskbox.list()] == [created.id]


async def test_unreachable_database_raises_service_unavailable_after_bounded_retries(
    unreachable_database_url: str,
) -> None:
    settings = ApiSettings(database_url=unreachable_database_url, outbox_channel="outbox_down")
    retry = RetryPolicy(max_attempts=3, max_retry_after=0.05)
    async with client_of(settings, retry=retry) as (taskbox, transport):
        with pytest.raises(ServiceUnavailable) as raised:
            await taskbox.get(uuid.uuid4())
    assert raised.value.problem.status == 503
    assert transport.sent == [("GET", raised.value.problem.instance)] * 3


async def test_connection_refused_is_retried_then_raised() -> None:
    retry = RetryPolicy(max_attempts=3, backoff=0.01)
    async with AsyncClient(f"http://127.0.0.1:{free_port()}", retry=retry) as taskbox:
        started = time.monotonic()
        with pytest.raises(TransportError, match="after 3 attempts") as raised:
            await taskbox.create("echo")
    assert isinstance(raised.value.__cause__, httpx.ConnectError)
    assert time.monotonic() - started < 5


async def test_api_key_is_sent_as_bearer(api_settings: ApiSettings) -> None:
    settings = api_settings.model_copy(update={"api_keys": [SecretStr("s3cret")]})
    async with client_of(settings) as (anonymous, _):
        with pytest.raises(Unauthorized) as raised:
            await anonymous.create("echo")
        assert raised.value.status == 401
    async with client_of(settings, api_key="s3cret") as (keyed, _):
        assert (await keyed.create("echo")).status is TaskStatus.NEW


async def test_wait_times_out_with_the_last_status(
    wired: tuple[AsyncClient, Recording],
) -> None:
    taskbox, transport = wired
    created = await taskbox.create("echo")  # no relay: it stays NEW
    transport.sent.clear()
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as raised:
        await taskbox.wait(created.id, timeout=0.5)
    assert raised.value.last_status.status is TaskStatus.NEW
    assert raised.value.last_status.id == created.id
    # One long poll held for the whole timeout, not a poll every few milliseconds.
    assert transport.sent == [("GET", f"/api/v1/tasks/{created.id}")]
    assert 0.45 < time.monotonic() - started < 2.0


async def test_wait_returns_soon_after_the_outcome_commits(
    wired: tuple[AsyncClient, Recording], pool: asyncpg.Pool
) -> None:
    taskbox, transport = wired
    created = await taskbox.create("echo", {"n": 2})
    transport.sent.clear()
    waiting = asyncio.create_task(taskbox.wait(created.id, timeout=30))
    await asyncio.sleep(0.5)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE tasks SET status = 'PROCESSING' WHERE id = $1", created.id)
        await conn.execute(
            "UPDATE tasks SET status = 'DONE', result = '{\"n\": 2}' WHERE id = $1", created.id
        )
    committed = time.monotonic()
    done = await waiting
    assert time.monotonic() - committed < 1.0
    assert done.status is TaskStatus.DONE
    assert done.result == {"n": 2}
    assert len(transport.sent) == 1


# -- real processes -----------------------------------------------------------------------


async def test_sync_client_against_an_api_process(
    service_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    port = free_port()
    processes.append(await ServiceProcess("api", service_env, API_PORT=str(port)).start())

    def use() -> None:
        with Client(f"http://127.0.0.1:{port}", retry=QUICK) as taskbox:
            made = taskbox.create_many([{"type": "echo", "payload": {"n": n}} for n in range(3)])
            one = taskbox.create("sha256", {"text": "x"}, idempotency_key="sync-1")
            assert taskbox.create("sha256", {"text": "x"}, idempotency_key="sync-1") == one
            assert taskbox.get(one.id) == one
            assert taskbox.status(one.id).status is TaskStatus.NEW
            listed = [task.id for task in taskbox.list(page_size=2)]
            assert listed[0] == one.id
            assert sorted(listed[1:]) == sorted(task.id for task in made)
            assert taskbox.cancel(one.id).status is TaskStatus.CANCELLED
            with pytest.raises(NotFound):
                taskbox.get(uuid.uuid4())

    await asyncio.to_thread(use)


async def test_wait_returns_the_done_task_from_real_processes(
    service_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    port = free_port()
    processes.append(await ServiceProcess("api", service_env, API_PORT=str(port)).start())
    processes.append(await ServiceProcess("relay", service_env).start())
    processes.append(await ServiceProcess("consumer", service_env).start())
    async with AsyncClient(f"http://127.0.0.1:{port}") as taskbox:
        created = await taskbox.create("sha256", {"text": "taskbox"})
        done = await taskbox.wait(created.id, timeout=20)
    assert done.status is TaskStatus.DONE
    assert done.result == {"sha256": hashlib.sha256(b"taskbox").hexdigest()}

    def wait_sync() -> models.Task:
        with Client(f"http://127.0.0.1:{port}") as taskbox:
            return taskbox.wait(taskbox.create("echo", {"x": 1}).id, timeout=20)

    assert (await asyncio.to_thread(wait_sync)).result == {"x": 1}


# -- the models against the OpenAPI document ----------------------------------------------

# The client's model for each schema of the document.
MODELS: dict[str, type[BaseModel]] = {
    "Task": models.Task,
    "TaskSummary": models.TaskSummary,
    "TaskError": models.TaskError,
    "TaskStatusView": models.TaskStatusView,
    "TaskSummaryPage": models.TaskSummaryPage,
    "TaskPage": models.TaskPage,
    "TaskBatch": models.TaskBatch,
    "Problem": models.Problem,
}
_PROSE = {"title", "description", "examples"}


def shape(schema: Any) -> Any:
    """A schema without its prose, each reference reduced to the name it refers to.

    A ``"default": null`` goes too: FastAPI leaves it out of the document; whether a
    field is optional shows in ``required``."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return {"$ref": schema["$ref"].rsplit("/", 1)[-1]}
        return {
            key: shape(value)
            for key, value in schema.items()
            if key not in _PROSE and not (key == "default" and value is None)
        }
    if isinstance(schema, list):
        return [shape(item) for item in schema]
    return schema


@pytest.fixture
async def openapi(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    schemas: dict[str, Any] = response.json()["components"]["schemas"]
    return schemas


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_the_openapi_document(name: str, openapi: dict[str, Any]) -> None:
    ours = MODELS[name].model_json_schema()
    ours.pop("$defs", None)
    assert shape(ours) == shape(openapi[name])


def test_status_values_match_the_openapi_document(openapi: dict[str, Any]) -> None:
    assert [status.value for status in TaskStatus] == openapi["TaskStatus"]["enum"]


def test_new_task_has_the_fields_of_the_create_body(openapi: dict[str, Any]) -> None:
    body = openapi["TaskCreate"]
    ours = models.NewTask.model_json_schema()
    assert ours["properties"].keys() == body["properties"].keys()
    assert set(ours.get("required", [])) == set(body.get("required", []))
