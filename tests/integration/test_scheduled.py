"""Scheduled tasks (``run_at`` / ``delay_seconds``) against the real Postgres and RabbitMQ.

The API runs in-process (``client``); its wake-ups are real NOTIFYs on this test's
channel. The relay runs as ``python -m relay`` with a long poll interval, so a task that
goes out on time went out because the relay slept only until it fell due, not because
it happened to poll. Waiting is always a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import httpx
import pytest

from taskbox.api.settings import ApiSettings
from taskbox.broker import messages
from taskbox.broker.settings import BrokerSettings
from tests.integration.conftest import app_client_for
from tests.integration.helpers_broker import queue_depth, take_all
from tests.integration.processes import ServiceProcess
from tests.integration.test_relay import eventually, relay_processes, wait_for_listeners

TASKS = "/api/v1/tasks"
PROBLEM_JSON = "application/problem+json"
# The relay's poll: far longer than any wait below, so it never explains a publish.
LONG_POLL = "30"


# --------------------------------------------------------------------------- helpers


def moment(seconds_from_now: float, offset_hours: int = 0) -> str:
    """ISO 8601 for now + ``seconds_from_now``, written with a ``+HH:00`` offset."""
    zone = timezone(timedelta(hours=offset_hours))
    return (datetime.now(UTC) + timedelta(seconds=seconds_from_now)).astimezone(zone).isoformat()


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def counts(pool: asyncpg.Pool) -> tuple[int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM tasks) AS tasks, (SELECT count(*) FROM outbox) AS events"
    )
    assert row is not None
    return row["tasks"], row["events"]


async def task_row(pool: asyncpg.Pool, task_id: str) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT status, run_at, created_at, finished_at FROM tasks WHERE id = $1",
        uuid.UUID(task_id),
    )
    assert row is not None, task_id
    return row


async def outbox_rows(pool: asyncpg.Pool, task_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT id, available_at, published_at FROM outbox WHERE task_id = $1 ORDER BY id",
        uuid.UUID(task_id),
    )
    return rows


async def is_published(pool: asyncpg.Pool, task_id: str) -> bool:
    rows = await outbox_rows(pool, task_id)
    return bool(rows) and all(r["published_at"] is not None for r in rows)


async def create(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post(TASKS, json={"type": "echo", "payload": {"x": 1}, **fields})
    assert response.status_code == 201, response.text
    task: dict[str, Any] = response.json()
    return task


def task_ids_in(taken: list[Any]) -> list[str]:
    return [str(messages.parse(message.body).task_id) for message in taken]


@asynccontextmanager
async def running_relay(
    pool: asyncpg.Pool, service_env: dict[str, str], **env: str
) -> AsyncIterator[ServiceProcess]:
    """``python -m relay`` with a long poll, once its LISTEN connection is up."""
    async with relay_processes({**service_env, "RELAY_POLL_INTERVAL": LONG_POLL, **env}) as (
        relay,
    ):
        await wait_for_listeners(pool, 1)
        yield relay


# ------------------------------------------------------------------- 1. validation


BodyOf = Callable[[], str]


def body(**fields: Any) -> BodyOf:
    """A request body built when the test runs (moments are relative to then)."""

    def build() -> str:
        document = {"type": "echo", "payload": {"x": 1}}
        for name, value in fields.items():
            document[name] = value() if callable(value) else value
        return json.dumps(document)

    return build


def raw(text: str) -> BodyOf:
    return lambda: text


# With MAX_SCHEDULE_DELAY of 60 s for these cases.
INVALID: list[Any] = [
    pytest.param(
        body(run_at=lambda: moment(10), delay_seconds=10),
        ["body", "delay_seconds"],
        "value_error",
        id="both-run_at-and-delay",
    ),
    pytest.param(
        body(
            run_at=lambda: (
                (datetime.now(UTC) + timedelta(seconds=10)).replace(tzinfo=None).isoformat()
            )
        ),
        ["body", "run_at"],
        "timezone_aware",
        id="naive-run_at",
    ),
    pytest.param(
        body(run_at=lambda: moment(120, offset_hours=2)),
        ["body", "run_at"],
        "too_far",
        id="run_at-too-far",
    ),
    pytest.param(body(delay_seconds=61), ["body", "delay_seconds"], "too_far", id="delay-too-far"),
    pytest.param(body(delay_seconds=-1), ["body", "delay_seconds"], None, id="negative-delay"),
    pytest.param(body(delay_seconds=-0.001), ["body", "delay_seconds"], None, id="tiny-negative"),
    pytest.param(body(delay_seconds="5"), ["body", "delay_seconds"], None, id="delay-as-string"),
    pytest.param(body(delay_seconds=True), ["body", "delay_seconds"], None, id="delay-as-bool"),
    pytest.param(
        raw('{"type": "echo", "delay_seconds": NaN}'),
        ["body", "delay_seconds"],
        None,
        id="delay-nan",
    ),
    pytest.param(
        raw('{"type": "echo", "delay_seconds": Infinity}'),
        ["body", "delay_seconds"],
        None,
        id="delay-infinity",
    ),
    pytest.param(body(run_at="not a date"), ["body", "run_at"], None, id="run_at-not-a-date"),
    pytest.param(body(run_at=1767225600), ["body", "run_at"], None, id="run_at-as-number"),
    # Year 1 at +01:00 is year 0 in UTC: outside what the driver can send; a 422, not a 500.
    pytest.param(
        body(run_at="0001-01-01T00:00:00+01:00"),
        ["body", "run_at"],
        None,
        id="run_at-before-year-1-utc",
    ),
]


@pytest.mark.parametrize(("make_body", "loc", "error_type"), INVALID)
async def test_invalid_schedules_are_422_problems_and_store_nothing(
    api_settings: ApiSettings,
    pool: asyncpg.Pool,
    make_body: BodyOf,
    loc: list[str],
    error_type: str | None,
) -> None:
    settings = api_settings.model_copy(update={"max_schedule_delay": 60.0})
    async with app_client_for(settings) as client:
        response = await client.post(
            TASKS, content=make_body(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    problem = response.json()
    assert problem["status"] == 422
    assert [error["loc"] for error in problem["errors"]] == [loc], problem
    (error,) = problem["errors"]
    assert error["msg"], problem
    if error_type is not None:
        assert error["type"] == error_type, problem
    assert await counts(pool) == (0, 0)


async def test_the_limit_itself_is_accepted(api_settings: ApiSettings, pool: asyncpg.Pool) -> None:
    settings = api_settings.model_copy(update={"max_schedule_delay": 60.0})
    async with app_client_for(settings) as client:
        by_delay = await create(client, delay_seconds=60)
        by_moment = await create(client, run_at=moment(55))
    assert by_delay["status"] == by_moment["status"] == "NEW"
    assert await counts(pool) == (2, 2)


# --------------------------------------------------------------------- 2. accepted


async def test_run_at_with_an_offset_is_stored_as_that_instant(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    wanted = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=123456)
    sent = wanted.astimezone(timezone(timedelta(hours=2))).isoformat()
    assert sent.endswith("+02:00")

    task = await create(client, run_at=sent)
    assert task["status"] == "NEW"
    assert ts(task["run_at"]) == wanted
    fetched = (await client.get(f"{TASKS}/{task['id']}")).json()
    assert ts(fetched["run_at"]) == wanted
    assert fetched["status"] == "NEW"

    row = await task_row(pool, task["id"])
    assert row["run_at"] == wanted
    (event,) = await outbox_rows(pool, task["id"])
    assert event["available_at"] == wanted
    assert event["published_at"] is None


async def test_delay_seconds_counts_from_the_database_clock(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    for delay in (30, 2.5, 0):
        task = await create(client, delay_seconds=delay)
        assert task["status"] == "NEW"
        run_at, created_at = ts(task["run_at"]), ts(task["created_at"])
        assert abs((run_at - created_at).total_seconds() - delay) < 1.0, task
        (event,) = await outbox_rows(pool, task["id"])
        assert event["available_at"] == run_at == (await task_row(pool, task["id"]))["run_at"]


async def test_an_unscheduled_task_has_no_run_at_and_is_due_now(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    task = await create(client)
    assert task["run_at"] is None
    (event,) = await outbox_rows(pool, task["id"])
    assert event["available_at"] == ts(task["created_at"])


# ----------------------------------------------------------------------- 3. relay


async def test_relay_holds_a_scheduled_task_until_due_then_publishes_it_promptly(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
) -> None:
    async with running_relay(pool, service_env) as relay:
        started = time.monotonic()
        later = await create(client, delay_seconds=1.0)
        now = await create(client)

        async def now_published() -> bool:
            return await is_published(pool, now["id"])

        await eventually(now_published, 2.0, "the unscheduled task is published")

        # Half a second in: the scheduled one is still waiting, in the database and
        # in the queue.
        await asyncio.sleep(max(0.0, started + 0.5 - time.monotonic()))
        assert (await task_row(pool, later["id"]))["status"] == "NEW", relay.output
        assert not await is_published(pool, later["id"])
        assert await queue_depth(broker_settings) == 1
        assert (await task_row(pool, now["id"]))["status"] == "PENDING"

        async def later_published() -> bool:
            return await is_published(pool, later["id"])

        await eventually(later_published, 5.0, "the scheduled task is published when due")
        elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"published after {elapsed:.1f}s: the relay waited for its poll"
    assert (await task_row(pool, later["id"]))["status"] == "PENDING"
    (event,) = await outbox_rows(pool, later["id"])
    assert event["published_at"] >= ts(later["run_at"]), "published before its run_at"
    assert task_ids_in(await take_all(broker_settings)) == [now["id"], later["id"]]


# ------------------------------------------------------------------ 4. in the past


async def test_a_run_at_in_the_past_is_published_at_once(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
) -> None:
    past = datetime.now(UTC) - timedelta(hours=3)
    async with running_relay(pool, service_env):
        task = await create(client, run_at=past.isoformat())
        assert ts(task["run_at"]) == past

        async def published() -> bool:
            return await is_published(pool, task["id"])

        await eventually(published, 2.0, "a task due in the past is published at once")
    (event,) = await outbox_rows(pool, task["id"])
    # Due from its creation: it does not jump ahead of tasks created before it.
    assert event["available_at"] == ts(task["created_at"])
    assert (await task_row(pool, task["id"]))["status"] == "PENDING"
    assert task_ids_in(await take_all(broker_settings)) == [task["id"]]


# ----------------------------------------------------------------------- 5. cancel


async def test_a_cancelled_scheduled_task_is_never_published(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
) -> None:
    async with running_relay(pool, service_env) as relay:
        doomed = await create(client, delay_seconds=1.5)
        # Due just after the cancelled one: once it is out, the relay has been past the
        # cancelled task's moment.
        witness = await create(client, delay_seconds=2.0)

        response = await client.delete(f"{TASKS}/{doomed['id']}")
        assert response.status_code == 200, response.text
        cancelled = response.json()
        assert cancelled["status"] == "CANCELLED"
        assert cancelled["finished_at"] is not None
        row = await task_row(pool, doomed["id"])
        assert row["status"] == "CANCELLED"
        assert await pool.fetchval("SELECT now()") < row["run_at"], "cancelled too late"

        async def witness_published() -> bool:
            return await is_published(pool, witness["id"])

        await eventually(witness_published, 6.0, "the later task is published")
        assert await pool.fetchval("SELECT now()") > row["run_at"]
        # Its row fell due before the witness's and was closed without being sent.
        closed = await pool.fetchrow(
            "SELECT published_at, last_error FROM outbox WHERE task_id = $1",
            uuid.UUID(doomed["id"]),
        )
        assert closed["published_at"] is not None, relay.output
        assert closed["last_error"] == "not sent: task CANCELLED"
    assert (await task_row(pool, doomed["id"]))["status"] == "CANCELLED"
    assert task_ids_in(await take_all(broker_settings)) == [witness["id"]]
    assert await queue_depth(broker_settings) == 0


# ------------------------------------------------------------------ 6. idempotency


async def test_idempotency_key_compares_an_explicit_run_at(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    wanted = (datetime.now(UTC) + timedelta(minutes=10)).replace(microsecond=250000)
    request = {"type": "echo", "payload": {"x": 1}, "run_at": wanted.isoformat()}
    key = {"Idempotency-Key": "scheduled-1"}

    first = await client.post(TASKS, json=request, headers=key)
    assert first.status_code == 201, first.text
    again = await client.post(TASKS, json=request, headers=key)
    assert again.status_code == 200, again.text
    assert again.json() == first.json()

    # The same instant written with another offset is the same request.
    shifted = wanted.astimezone(timezone(timedelta(hours=-5))).isoformat()
    same = await client.post(TASKS, json={**request, "run_at": shifted}, headers=key)
    assert same.status_code == 200, same.text
    assert same.json()["id"] == first.json()["id"]

    moved = (wanted + timedelta(seconds=1)).isoformat()
    clash = await client.post(TASKS, json={**request, "run_at": moved}, headers=key)
    assert clash.status_code == 409, clash.text
    assert clash.headers["content-type"] == PROBLEM_JSON
    assert first.json()["id"] in clash.json()["detail"]

    # A key first used without run_at conflicts with a retry that names one.
    plain = {"type": "echo", "payload": {"x": 1}}
    other_key = {"Idempotency-Key": "scheduled-2"}
    assert (await client.post(TASKS, json=plain, headers=other_key)).status_code == 201
    named = await client.post(TASKS, json={**plain, "run_at": moment(60)}, headers=other_key)
    assert named.status_code == 409, named.text

    assert await counts(pool) == (2, 2)
    row = await task_row(pool, first.json()["id"])
    assert row["run_at"] == wanted


async def test_idempotency_key_does_not_compare_delay_seconds(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    request = {"type": "echo", "payload": {"x": 1}, "delay_seconds": 30}
    key = {"Idempotency-Key": "delayed"}
    first = await client.post(TASKS, json=request, headers=key)
    assert first.status_code == 201, first.text
    again = await client.post(TASKS, json={**request, "delay_seconds": 45}, headers=key)
    assert again.status_code == 200, again.text
    assert again.json() == first.json(), "the retry must not move the original moment"
    assert await counts(pool) == (1, 1)


# ------------------------------------------------------- 7. no head-of-line blocking


async def test_a_far_scheduled_task_does_not_hold_up_due_ones(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
) -> None:
    # Small batches: the due tasks take several claims, each of which sees the
    # scheduled row first by id.
    async with running_relay(pool, service_env, RELAY_BATCH_SIZE="5") as relay:
        far = await create(client, delay_seconds=3600)
        due = [await create(client, priority=i % 10) for i in range(20)]

        async def all_due_published() -> bool:
            published = await pool.fetchval(
                "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL"
            )
            return bool(published == 20)

        await eventually(all_due_published, 5.0, "the 20 due tasks are published")
        assert (await task_row(pool, far["id"]))["status"] == "NEW", relay.output
    assert not await is_published(pool, far["id"])
    statuses = await pool.fetch("SELECT status, count(*) AS n FROM tasks GROUP BY status")
    assert {r["status"]: r["n"] for r in statuses} == {"PENDING": 20, "NEW": 1}
    taken = task_ids_in(await take_all(broker_settings))
    assert sorted(taken) == sorted(t["id"] for t in due)
