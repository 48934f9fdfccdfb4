"""``python -m relay status`` against the real Postgres and RabbitMQ."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg
import orjson

from taskbox.broker.settings import BrokerSettings
from taskbox.db.schedules import SCHEDULER_LOCK, ScheduleDefinition, create_schedule
from taskbox.db.tasks import NewTask, create_task
from taskbox.runtime.queues import amqp_queue_name
from tests.integration.helpers_broker import topology
from tests.integration.processes import free_port, run_argv, run_command


async def test_status_shows_tasks_outbox_and_queues(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, service_env: dict[str, str]
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        ids = [(await create_task(conn, NewTask("echo", {"i": i}, 0, 3)))["id"] for i in range(6)]
    # Two published (PENDING, for a minute now), one FAILED, three still in the outbox,
    # one of which the broker refused and waits out a backoff.
    await pool.execute(
        "UPDATE tasks SET status = 'PENDING', updated_at = now() - interval '61 seconds' "
        "WHERE id = ANY($1::uuid[])",
        ids[:2],
    )
    await pool.execute("UPDATE tasks SET status = 'FAILED' WHERE id = $1", ids[2])
    await pool.execute(
        "UPDATE outbox SET published_at = now() WHERE task_id = ANY($1::uuid[])", ids[:3]
    )
    await pool.execute(
        "UPDATE outbox SET created_at = now() - interval '90 seconds', "
        "available_at = now() - interval '90 seconds' WHERE task_id = $1",
        ids[3],
    )
    await pool.execute(
        "UPDATE outbox SET last_error = 'DeliveryError: NO_ROUTE', "
        "available_at = now() + interval '1 hour' WHERE task_id = $1",
        ids[5],
    )
    async with topology(broker_settings) as topo:
        channel = topo.queue.channel
        for _ in range(2):
            await topo.exchange.publish(
                aio_pika.Message(b"{}"), routing_key=broker_settings.queue_name
            )
        dlx = await channel.get_exchange(broker_settings.dead_letter_exchange)
        await dlx.publish(aio_pika.Message(b"dead"), routing_key="")

    result = await run_command("relay", ["status"], service_env)
    assert result.code == 0, result
    out = result.stdout
    assert "tasks         NEW 3  PENDING 2  PROCESSING 0  DONE 0  FAILED 1  CANCELLED 0" in out
    assert "(total 6)" in out
    assert "oldest PENDING waits 1m" in out
    assert "outbox        backlog 3 rows (2 due, 1 waiting for their time), lag 1m3" in out
    assert "failing 1" in out
    assert "last publish error: DeliveryError: NO_ROUTE" in out
    assert "table ~6 rows" in out
    assert f"amqp queues   {broker_settings.queue_name}: 2 ready, 0 consumers" in out
    assert f"dead letters  {broker_settings.dead_letter_queue}: 1 ready, 0 consumers" in out
    assert "postgres 127.0.0.1:5432/taskbox_test_" in out.splitlines()[0]
    assert len(out.splitlines()) <= 24, "one screen"

    as_json = await run_command("relay", ["status", "--json"], service_env)
    assert as_json.code == 0, as_json
    document = orjson.loads(as_json.stdout)
    assert document["tasks"] == {"NEW": 3, "PENDING": 2, "FAILED": 1}
    assert document["backlog"]["rows"] == 3
    assert document["backlog"]["due"] == 2
    assert document["queue"]["messages"] == 2
    assert document["dead_letters"]["messages"] == 1


async def test_status_says_what_it_could_not_reach(service_env: dict[str, str]) -> None:
    env = {
        **service_env,
        "DATABASE_URL": f"postgresql://postgres:secret@127.0.0.1:{free_port()}/nothing",
        "AMQP_URL": f"amqp://guest:secret@127.0.0.1:{free_port()}/",
        "DB_CONNECT_TIMEOUT": "2",
    }
    result = await run_command("relay", ["status"], env)
    assert result.code == 1, result
    assert "postgres      UNREACHABLE:" in result.stdout
    assert "amqp queues   " in result.stdout
    assert "secret" not in result.stdout  # the URLs are shown without their passwords


async def test_status_of_queues_nobody_declared_yet(
    pool: asyncpg.Pool, service_env: dict[str, str]
) -> None:
    result = await run_command("relay", ["status"], service_env)
    assert result.code == 0, result
    assert "does not exist (yet)" in result.stdout
    assert "tasks         NEW 0" in result.stdout


async def test_status_shows_the_amqp_queue_of_every_queue_in_use(
    pool: asyncpg.Pool, service_env: dict[str, str], broker_settings: BrokerSettings
) -> None:
    """A named queue in use (a task waits in it) gets its AMQP queue's line too: the
    depth RabbitMQ holds for it beside the default queue's."""
    await create_task(pool, NewTask("echo", {}, 0, 3, queue="media"))
    media = amqp_queue_name(broker_settings.queue_name, "media")
    connection = await aio_pika.connect(broker_settings.amqp_url)
    try:
        async with topology(broker_settings):
            channel = await connection.channel()
            await channel.declare_queue(media, durable=True)
            for _ in range(3):
                await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=media)
            result = await run_command("relay", ["status"], service_env)
            as_json = await run_command("relay", ["status", "--json"], service_env)
    finally:
        async with connection:
            await (await connection.channel()).queue_delete(media)
    assert result.code == 0, result
    lines = result.stdout.splitlines()
    at = lines.index(f"amqp queues   {broker_settings.queue_name}: 0 ready, 0 consumers")
    assert lines[at + 1] == f"              {media}: 3 ready, 0 consumers", result.stdout
    named = orjson.loads(as_json.stdout)["named_queues"]
    assert [(q["name"], q["messages"]) for q in named] == [(media, 3)]


async def test_status_lists_schedules_with_their_next_fire_time_and_who_leads(
    pool: asyncpg.Pool, service_env: dict[str, str]
) -> None:
    now = datetime.now(UTC)
    await create_schedule(pool, ScheduleDefinition("nightly", "echo", cron="0 3 * * *"), now)
    await create_schedule(
        pool, ScheduleDefinition("beat", "echo", interval_seconds=60.0, paused=True), now
    )
    result = await run_command("relay", ["status"], service_env)
    assert result.code == 0, result
    out = result.stdout
    assert "schedules     2, NO SCHEDULER LEADS" in out
    assert "nightly: echo, cron 0 3 * * * (UTC), next " in out
    assert "beat: echo, every 60 s, PAUSED [api]" in out
    document = orjson.loads((await run_command("relay", ["status", "--json"], service_env)).stdout)
    assert [s["name"] for s in document["schedules"]] == ["beat", "nightly"]

    async with pool.acquire() as leader:  # as a leading relay's scheduler holds it
        assert await leader.fetchval("SELECT pg_try_advisory_lock($1)", SCHEDULER_LOCK)
        await leader.execute("SET application_name = 'taskbox-scheduler:4242'")
        result = await run_command("relay", ["status"], service_env)
        await leader.execute("SELECT pg_advisory_unlock_all()")
    assert "schedules     2, led by taskbox-scheduler:4242" in result.stdout


async def test_the_schedules_command_lists_shows_pauses_resumes_runs_and_deletes(
    pool: asyncpg.Pool, service_env: dict[str, str]
) -> None:
    now = datetime.now(UTC)
    await create_schedule(pool, ScheduleDefinition("nightly", "echo", cron="0 3 * * *"), now)
    taskbox = [str(Path(sys.executable).parent / "taskbox"), "schedules"]
    env = service_env
    listed = await run_argv([*taskbox, "list"], service_env)
    assert listed.code == 0, listed
    assert "nightly  echo  cron 0 3 * * * (UTC)  next " in listed.stdout
    paused = await run_argv([*taskbox, "pause", "nightly"], service_env)
    assert paused.code == 0 and "paused" in paused.stdout
    assert await pool.fetchval("SELECT paused FROM schedules WHERE name = 'nightly'")
    resumed = await run_argv([*taskbox, "resume", "nightly"], service_env)
    assert resumed.code == 0, resumed
    ran = await run_argv([*taskbox, "run", "nightly"], service_env)
    assert ran.code == 0 and "created task" in ran.stdout
    shown = await run_argv([*taskbox, "show", "nightly"], service_env)
    document = orjson.loads(shown.stdout)
    assert len(document["next_fire_times"]) == 5 and len(document["last_ticks"]) == 1
    missing = await run_argv([*taskbox, "show", "nope"], service_env)
    assert missing.code == 1 and "no schedule named 'nope'" in missing.stderr
    assert (await run_argv([*taskbox, "pause"], service_env)).code == 2
    deleted = await run_argv([*taskbox, "delete", "nightly"], service_env)
    assert deleted.code == 0, deleted
    assert await pool.fetchval("SELECT count(*) FROM schedules") == 0
    assert await pool.fetchval("SELECT count(*) FROM tasks") == 1  # the run-now task stays

    create = [*taskbox, "create", "weekday", "--type", "echo", "--payload", '{"k": 1}']
    made = await run_argv([*create, "--cron", "0 6 * * 1-5", "--timezone", "Europe/Berlin"], env)
    assert made.code == 0 and "created schedule 'weekday': next " in made.stdout, made
    again = await run_argv([*create, "--every", "60"], env)
    assert again.code == 1 and "exists already" in again.stderr
    for bad, said in (
        (["--cron", "61 * * * *"], "not a cron line"),
        (["--cron", "* * * * *", "--timezone", "Mars/Base"], "unknown time zone"),
        (["--every", "60", "--type", "nope"], "no task type 'nope'"),
    ):
        refused = await run_argv([*create[:3], "other", *create[4:], *bad], env)
        assert refused.code == 2 and said in refused.stderr, refused
    row = await pool.fetchrow("SELECT * FROM schedules WHERE name = 'weekday'")
    assert (row["cron"], row["timezone"], row["payload"]) == (
        "0 6 * * 1-5",
        "Europe/Berlin",
        {"k": 1},
    )
