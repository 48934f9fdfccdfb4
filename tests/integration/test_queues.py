"""Named queues (issue 15): routing by queue through real api, relay and consumers.

Each task type declares its queue; the relay publishes each task to its queue's AMQP
queue (declared on first use), and a consumer serves only the queues of CONSUMER_QUEUES
and loads only their types. A queue with work and no consumer shows in GET
/api/v1/queues and `taskbox status`.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest

from taskbox.api.settings import ApiSettings
from taskbox.broker.settings import BrokerSettings
from taskbox.db.tasks import NewTask, create_task
from taskbox.runtime.queues import amqp_queue_name
from tests.integration.conftest import app_client_for, poll_until_done
from tests.integration.processes import ServiceProcess, free_port, run_command

QUEUE_TASKS = {"TASK_MODULES": "tests.integration.queue_tasks:app"}


@pytest.fixture
async def named_queues(broker_settings: BrokerSettings) -> AsyncIterator[list[str]]:
    """The AMQP queues of this test's named queues, deleted afterwards (the
    broker_settings fixture deletes the default one)."""
    names = [amqp_queue_name(broker_settings.queue_name, q) for q in ("media", "bulk")]
    yield names
    connection = await aio_pika.connect(broker_settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


async def depth(settings: BrokerSettings, name: str) -> int | None:
    """Ready messages in ``name``; None when the queue does not exist."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        return queue.declaration_result.message_count


async def create(client: httpx.AsyncClient, type_: str, n: int, **extra: Any) -> str:
    created = await client.post("/api/v1/tasks", json={"type": type_, "payload": {"n": n}, **extra})
    assert created.status_code == 201, created.text
    location: str = created.headers["location"]
    return location


async def test_each_type_runs_only_in_the_consumer_pool_of_its_queue(
    service_env: dict[str, str],
    broker_settings: BrokerSettings,
    pool: asyncpg.Pool,
    named_queues: list[str],
) -> None:
    port = free_port()
    env = {**service_env, **QUEUE_TASKS}
    api = await ServiceProcess("api", env, API_PORT=str(port)).start()
    relay = await ServiceProcess("relay", env).start()
    media = await ServiceProcess("consumer", env, CONSUMER_QUEUES="media:4,bulk:2").start()
    general = await ServiceProcess("consumer", env, CONSUMER_QUEUES="default").start()
    try:
        # Both know every type (a task keeps its queue when its type moves): routing
        # alone keeps each type in its pool, which the worker ids below show.
        await media.wait_for("task types: echo, fail, render, report, sha256, sleep, thumb")
        await general.wait_for("task types: echo, fail, render, report, sha256, sleep, thumb")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            made = {
                "render": [await create(client, "render", n) for n in range(10)],
                "thumb": [await create(client, "thumb", n) for n in range(5)],
                "bulk": [await create(client, "thumb", n, queue="bulk") for n in range(5)],
                "report": [await create(client, "report", n) for n in range(10)],
                "echo": [await create(client, "echo", n) for n in range(5)],
            }
            done = {
                kind: [await poll_until_done(client, loc, within=20) for loc in locations]
                for kind, locations in made.items()
            }
            listed = (await client.get("/api/v1/queues")).json()["items"]
        queues_of = {kind: {t["queue"] for t in tasks} for kind, tasks in done.items()}
        assert queues_of == {
            "render": {"media"},
            "thumb": {"media"},
            "bulk": {"bulk"},
            "report": {"default"},
            "echo": {"default"},
        }
        workers = {
            row["id"]: row["worker_id"]
            for row in await pool.fetch("SELECT id, worker_id, queue FROM tasks")
        }
        assert len(workers) == 35
        for kind, tasks in done.items():
            expected = "/media" if kind in ("render", "thumb") else f"/{tasks[0]['queue']}"
            ran_by = {workers[uuid.UUID(t["id"])] for t in tasks}
            assert all(w.endswith(expected) for w in ran_by), (kind, ran_by)
        # the media pool's process ran media and bulk, the other process default only
        media_pid = str(media.proc.pid) if media.proc else "?"
        general_pid = str(general.proc.pid) if general.proc else "?"
        for row in await pool.fetch("SELECT queue, worker_id FROM tasks"):
            pid = row["worker_id"].split(":")[1]
            assert pid == (general_pid if row["queue"] == "default" else media_pid), dict(row)
        # Nothing waits; every queue in use is listed with its consumers.
        by_name = {q["name"]: q for q in listed}
        assert set(by_name) == {"default", "media", "bulk"}
        for queue in by_name.values():
            assert queue["waiting"] == 0 and queue["running"] == 0, queue
            assert queue["consumers"] == 1 and queue["paused"] is False, queue
        # The consumers of one queue never saw a message of another.
        for consumer in (media, general):
            assert "UnknownTaskType" not in consumer.output
    finally:
        assert await general.stop(signal.SIGTERM) == 0, general.output
        assert await media.stop(signal.SIGTERM) == 0, media.output
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
        assert await api.stop(signal.SIGTERM) in (0, -signal.SIGTERM), api.output
    for name in (broker_settings.queue_name, *named_queues):
        assert await depth(broker_settings, name) == 0, name


async def test_a_create_naming_a_queue_its_type_is_not_registered_for_is_a_422(
    api_settings: ApiSettings,
) -> None:
    settings = api_settings.model_copy(update={"task_modules": [QUEUE_TASKS["TASK_MODULES"]]})
    async with app_client_for(settings) as client:
        wrong = await client.post(
            "/api/v1/tasks", json={"type": "thumb", "payload": {}, "queue": "default"}
        )
        assert wrong.status_code == 422, wrong.text
        (error,) = wrong.json()["errors"]
        assert error["loc"] == ["body", "queue"]
        assert "allowed queues: media, bulk" in error["msg"], error
        invalid = await client.post(
            "/api/v1/tasks", json={"type": "echo", "payload": {}, "queue": "No Such!"}
        )
        assert invalid.status_code == 422, invalid.text
        assert "invalid queue name 'No Such!'" in invalid.json()["errors"][0]["msg"]
        # in a batch, by position
        batch = await client.post(
            "/api/v1/tasks/batch",
            json={
                "tasks": [
                    {"type": "render", "payload": {}},
                    {"type": "render", "payload": {}, "queue": "bulk"},
                ]
            },
        )
        assert batch.status_code == 422, batch.text
        assert [e["loc"] for e in batch.json()["errors"]] == [["body", "tasks", 1, "queue"]]
        # the type's own queue, and another it is registered for
        own = await client.post("/api/v1/tasks", json={"type": "thumb", "payload": {}})
        assert own.status_code == 201 and own.json()["queue"] == "media", own.text
        other = await client.post(
            "/api/v1/tasks", json={"type": "thumb", "payload": {}, "queue": "bulk"}
        )
        assert other.status_code == 201 and other.json()["queue"] == "bulk", other.text


async def test_a_queue_with_work_and_no_consumer_is_visible_and_holds_its_tasks(
    service_env: dict[str, str],
    broker_settings: BrokerSettings,
    named_queues: list[str],
) -> None:
    """No consumer serves media: its tasks wait in its AMQP queue (the relay declared
    it), GET /api/v1/queues and `taskbox status` show them waiting with no consumer,
    and a consumer started for media later runs them."""
    port = free_port()
    env = {**service_env, **QUEUE_TASKS}
    api = await ServiceProcess("api", env, API_PORT=str(port)).start()
    relay = await ServiceProcess("relay", env).start()
    general = await ServiceProcess("consumer", env).start()  # default only
    media: ServiceProcess | None = None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            waiting = [await create(client, "render", n) for n in range(3)]
            served = await create(client, "report", 1)
            await poll_until_done(client, served, within=20)
            for _ in range(100):
                if await depth(broker_settings, named_queues[0]) == 3:
                    break
                await asyncio.sleep(0.1)
            assert await depth(broker_settings, named_queues[0]) == 3
            listed = {q["name"]: q for q in (await client.get("/api/v1/queues")).json()["items"]}
            assert listed["media"]["waiting"] == 3, listed
            assert listed["media"]["consumers"] == 0, listed
            assert listed["media"]["oldest_waiting_seconds"] is not None, listed
            assert listed["default"]["consumers"] == 1, listed
            shown = await run_command("relay", ["status"], env, timeout=30)
            line = next(x for x in shown.stdout.splitlines() if " media: " in x)
            assert "3 waiting" in line and "0 consumers" in line and "NO CONSUMER" in line, (
                shown.stdout
            )
            media = await ServiceProcess("consumer", env, CONSUMER_QUEUES="media").start()
            for location in waiting:
                task = await poll_until_done(client, location, within=20)
                assert task["queue"] == "media"
    finally:
        if media is not None:
            assert await media.stop(signal.SIGTERM) == 0, media.output
        assert await general.stop(signal.SIGTERM) == 0, general.output
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
        assert await api.stop(signal.SIGTERM) in (0, -signal.SIGTERM), api.output


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("media:x", "CONSUMER_QUEUES entry 'media:x': the concurrency after ':' must be"),
        ("media:0", "CONSUMER_QUEUES entry 'media:0': the concurrency must be >= 1"),
        ("Media", "CONSUMER_QUEUES entry 'Media': invalid queue name 'Media'"),
        ("media,media:2", "CONSUMER_QUEUES names queue 'media' twice"),
        ("media,,default", "CONSUMER_QUEUES has an empty entry"),
    ],
)
async def test_a_bad_consumer_queues_setting_stops_the_consumer_with_exit_2(
    service_env: dict[str, str], value: str, message: str
) -> None:
    result = await run_command("consumer", [], {**service_env, "CONSUMER_QUEUES": value})
    assert result.code == 2, result
    assert message in result.stderr, result


async def test_a_queue_whose_amqp_name_is_the_dead_letter_queue_is_refused(
    service_env: dict[str, str], broker_settings: BrokerSettings
) -> None:
    """QUEUE_NAME=x and DEAD_LETTER_QUEUE=x.dead: a queue named 'dead' would be the
    dead-letter queue itself. The consumer refuses to start (exit 2, saying why)."""
    env = {
        **service_env,
        "DEAD_LETTER_QUEUE": f"{broker_settings.queue_name}.dead",
        "CONSUMER_QUEUES": "default,dead",
    }
    try:
        result = await run_command("consumer", [], env)
    finally:
        connection = await aio_pika.connect(broker_settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            for name in (
                f"{broker_settings.queue_name}.dead",
                f"{broker_settings.queue_name}.dead.watch",
            ):
                await channel.queue_delete(name)
    assert result.code == 2, result
    assert "maps to the AMQP queue" in result.stderr and "DEAD_LETTER_QUEUE" in result.stderr, (
        result
    )


async def test_a_dead_lettered_message_of_a_named_queue_is_sent_again_to_its_queue(
    service_env: dict[str, str],
    broker_settings: BrokerSettings,
    pool: asyncpg.Pool,
    named_queues: list[str],
) -> None:
    """Every queue dead-letters into the watch: a media message the broker drops (here
    rejected without requeue, as a TTL or a delivery limit would) is sent again by the
    consumers' dead-letter watch, to the media queue, and runs there."""
    env = {**service_env, **QUEUE_TASKS}
    relay = await ServiceProcess("relay", env).start()
    consumer: ServiceProcess | None = None
    try:
        row = await create_task(pool, NewTask("render", {"n": 5}, 0, 3, queue="media"))
        for _ in range(100):
            if await depth(broker_settings, named_queues[0]) == 1:
                break
            await asyncio.sleep(0.1)
        connection = await aio_pika.connect(broker_settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(named_queues[0], passive=True)
            message = await queue.get(no_ack=False)
            await message.reject(requeue=False)
        assert await depth(broker_settings, broker_settings.dead_letter_watch_queue) == 1
        consumer = await ServiceProcess("consumer", env, CONSUMER_QUEUES="media").start()
        for _ in range(200):
            task = await pool.fetchrow(
                "SELECT status, result, queue FROM tasks WHERE id = $1", row["id"]
            )
            if task is not None and task["status"] == "DONE":
                break
            await asyncio.sleep(0.1)
        assert task is not None and dict(task) == {
            "status": "DONE",
            "result": {"rendered": 5},
            "queue": "media",
        }
        await consumer.wait_for("the broker dead-lettered the task's message")
    finally:
        if consumer is not None:
            assert await consumer.stop(signal.SIGTERM) == 0, consumer.output
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
    assert await depth(broker_settings, broker_settings.dead_letter_watch_queue) == 0
    assert await depth(broker_settings, named_queues[0]) == 0


async def test_a_task_created_before_its_type_moved_queue_still_runs(
    service_env: dict[str, str], pool: asyncpg.Pool, named_queues: list[str]
) -> None:
    """A task keeps the queue it was created on. ``render`` is now a media type, but a
    task of it created when it was a default type (its row says queue 'default') goes
    to the default queue's consumer, which must run it, not fail it as unknown."""
    task_id = await pool.fetchval(
        "WITH t AS (INSERT INTO tasks (type, payload, queue) VALUES ('render', $1, 'default')"
        " RETURNING id, type, priority)"
        " INSERT INTO outbox (task_id, kind, body, headers)"
        " SELECT id, 'task.created', jsonb_build_object('task_id', id, 'type', type,"
        " 'priority', priority), '{}'::jsonb FROM t RETURNING task_id",
        {"n": 1},
    )
    env = {**service_env, **QUEUE_TASKS}
    relay = await ServiceProcess("relay", env).start()
    general = await ServiceProcess("consumer", env, CONSUMER_QUEUES="default").start()
    try:
        for _ in range(200):
            row = await pool.fetchrow("SELECT status, worker_id FROM tasks WHERE id = $1", task_id)
            if row["status"] in ("DONE", "FAILED"):
                break
            await asyncio.sleep(0.1)
        assert row["status"] == "DONE", dict(row)
        assert row["worker_id"].endswith("/default")
    finally:
        for process in (general, relay):
            assert await process.stop(signal.SIGTERM) == 0, process.output
