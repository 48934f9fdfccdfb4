"""Long polls (``GET /api/v1/tasks/{id}?wait=``): woken by the task events the database
sends, bounded, capped, and still woken after the api's listener lost its connection."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from taskbox.api.settings import ApiSettings
from taskbox.api.task_events import APPLICATION_NAME_PREFIX
from taskbox.db import execution
from tests.conftest import ADMIN_DSN
from tests.integration.conftest import app_client_for
from tests.integration.processes import ServiceProcess, free_port

TASKS = "/api/v1/tasks"


async def finish(pool: asyncpg.Pool, task_id: uuid.UUID, status: str = "DONE") -> float:
    """Run the task's claim and outcome as a consumer would; the outcome's commit time."""
    await pool.execute("UPDATE tasks SET status = 'PENDING' WHERE id = $1", task_id)
    [claim] = await execution.claim_tasks(pool, [execution.Delivery(task_id, 0)], "w", 30.0)
    assert claim["claimed"]
    outcome = execution.Outcome(
        task_id=task_id, attempt=1, lease=claim["lease"], status=status, result={"n": 1}
    )
    await execution.finish_tasks(pool, [outcome], "w")
    return time.monotonic()


async def create(client: httpx.AsyncClient) -> uuid.UUID:
    response = await client.post(TASKS, json={"type": "echo", "payload": {}})
    assert response.status_code == 201
    return uuid.UUID(response.json()["id"])


async def listening(pool: asyncpg.Pool) -> int:
    """The pid of the api's task events connection, once it is connected."""
    for _ in range(100):
        pid = await pool.fetchval(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE $1",
            f"{APPLICATION_NAME_PREFIX}-%",
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.05)
    raise AssertionError("the api's task events connection never appeared")


@pytest.fixture
async def small_client(api_settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    """An app that serves one waiter at a time and lets a wait last 5 s at most."""
    settings = api_settings.model_copy(update={"task_wait_max_waiters": 1, "task_wait_max": 5.0})
    async with app_client_for(settings) as client:
        yield client


@pytest.mark.parametrize("path", ["", "/status"])
async def test_a_long_poll_returns_soon_after_the_outcome_commits(
    client: httpx.AsyncClient, pool: asyncpg.Pool, path: str
) -> None:
    task_id = await create(client)
    await listening(pool)
    started = time.monotonic()
    waiting = asyncio.create_task(client.get(f"{TASKS}/{task_id}{path}", params={"wait": 20}))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    committed = await finish(pool, task_id)
    response = await waiting
    answered = time.monotonic()
    assert response.status_code == 200
    assert response.json()["status"] == "DONE"
    assert answered - committed < 1.0
    assert answered - started < 5.0
    if not path:
        assert response.json()["result"] == {"n": 1}


async def test_a_long_poll_answers_at_the_deadline_with_the_current_state(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    task_id = await create(client)
    await listening(pool)
    # A change that is not an outcome does not end the wait.
    started = time.monotonic()
    waiting = asyncio.create_task(client.get(f"{TASKS}/{task_id}", params={"wait": 1.2}))
    await asyncio.sleep(0.3)
    await pool.execute("UPDATE tasks SET status = 'PENDING' WHERE id = $1", task_id)
    response = await waiting
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json()["status"] == "PENDING"
    assert 1.1 < elapsed < 3.0


async def test_a_finished_task_is_answered_at_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    task_id = await create(client)
    await finish(pool, task_id, "FAILED")
    started = time.monotonic()
    response = await client.get(f"{TASKS}/{task_id}", params={"wait": 20})
    assert response.json()["status"] == "FAILED"
    assert time.monotonic() - started < 1.0


async def test_a_wait_above_the_cap_is_refused_naming_it(small_client: httpx.AsyncClient) -> None:
    task_id = await create(small_client)
    response = await small_client.get(f"{TASKS}/{task_id}", params={"wait": 5.5})
    assert response.status_code == 422
    problem = response.json()
    assert problem["errors"][0]["loc"] == ["query", "wait"]
    assert "5 (TASK_WAIT_MAX)" in problem["detail"]


@pytest.mark.parametrize("wait", ["-1", "nan", "inf", "soon"])
async def test_a_wait_that_is_no_duration_is_refused(client: httpx.AsyncClient, wait: str) -> None:
    response = await client.get(f"{TASKS}/{uuid.uuid4()}", params={"wait": wait})
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["query", "wait"]


async def test_waiting_on_an_unknown_task_is_a_404(client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await client.get(f"{TASKS}/{uuid.uuid4()}", params={"wait": 20})
    assert response.status_code == 404
    assert time.monotonic() - started < 1.0


async def test_a_full_waiter_cap_is_a_503_with_retry_after(
    small_client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    task_id = await create(small_client)
    first = asyncio.create_task(small_client.get(f"{TASKS}/{task_id}", params={"wait": 3}))
    await asyncio.sleep(0.3)
    refused = await small_client.get(f"{TASKS}/{task_id}/status", params={"wait": 3})
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert "TASK_WAIT_MAX_WAITERS" in refused.json()["detail"]
    # A request that does not wait is served as ever.
    assert (await small_client.get(f"{TASKS}/{task_id}")).status_code == 200
    await finish(pool, task_id)
    assert (await first).json()["status"] == "DONE"
    # The slot is free again.
    response = await small_client.get(f"{TASKS}/{task_id}", params={"wait": 3})
    assert response.status_code == 200


async def test_an_outcome_committed_while_the_listener_was_cut_off_still_wakes_the_waiter(
    client: httpx.AsyncClient, pool: asyncpg.Pool, database_url: str
) -> None:
    task_id = await create(client)
    pid = await listening(pool)
    waiting = asyncio.create_task(client.get(f"{TASKS}/{task_id}", params={"wait": 20}))
    await asyncio.sleep(0.3)
    database = database_url.rsplit("/", 1)[1]
    # The listener cannot come back until the database takes connections again, so the
    # outcome's notification is sent while nobody of the api listens.
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", pid)
        await finish(pool, task_id)
        await asyncio.sleep(0.5)
        assert not waiting.done()
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    allowed = time.monotonic()
    response = await waiting
    assert response.json()["status"] == "DONE"
    # The reconnect (backoff at most 5 s) and the re-read, not the 20 s deadline.
    assert time.monotonic() - allowed < 7.0
    assert await listening(pool) != pid


async def test_a_client_that_gives_up_frees_its_waiter_slot(
    service_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    port = free_port()
    api = ServiceProcess("api", service_env, API_PORT=str(port), TASK_WAIT_MAX_WAITERS="1")
    processes.append(await api.start())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        task_id = await create(client)
        # The only slot, taken for 30 s by a client that stops listening after 0.5 s.
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"{TASKS}/{task_id}", params={"wait": 30}, timeout=0.5)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        response = await client.get(f"{TASKS}/{task_id}", params={"wait": 0.5})
        assert response.status_code == 200, response.text
        assert 0.4 < time.monotonic() - started < 3.0
