"""``python -m relay replay`` against the real Postgres and RabbitMQ.

The headline case is the operator's: RabbitMQ lost published messages (the queue was
purged), the tasks sit in PENDING, ``replay --stale-for`` sends them again and every
task runs once. The other tests run the command on tasks put into each status by hand.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest

from taskbox.broker.settings import BrokerSettings
from taskbox.db import replay as store
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, create_task
from tests.integration.helpers_broker import queue_depth
from tests.integration.processes import CommandResult, ServiceProcess, run_command

FAST_CONSUMER = {
    "HEARTBEAT_INTERVAL": "0.3",
    "TASK_STALE_AFTER": "1.5",
    "RESCUE_INTERVAL": "0.3",
}

_UUID = re.compile(r"^([0-9a-f-]{36})\s", re.MULTILINE)


async def create(pool: asyncpg.Pool, count: int, type_: str = "echo") -> list[uuid.UUID]:
    async with pool.acquire() as conn, conn.transaction():
        return [
            (
                await create_task(
                    conn, NewTask(type=type_, payload={"i": i}, priority=0, max_attempts=3)
                )
            )["id"]
            for i in range(count)
        ]


async def statuses(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> Counter[str]:
    rows = await pool.fetch("SELECT status FROM tasks WHERE id = ANY($1::uuid[])", ids)
    return Counter(row["status"] for row in rows)


async def until(check: Any, what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


async def replay(env: dict[str, str], *args: str) -> CommandResult:
    return await run_command("relay", ["replay", *args], env)


def listed(result: CommandResult) -> list[uuid.UUID]:
    """The task ids of a --dry-run table, in order."""
    return [uuid.UUID(found) for found in _UUID.findall(result.stdout)]


async def set_status(pool: asyncpg.Pool, task_id: uuid.UUID, status: str, **columns: Any) -> None:
    assignments = ", ".join(f"{name} = ${i + 3}" for i, name in enumerate(columns))
    await pool.execute(
        f"UPDATE tasks SET status = $2{', ' + assignments if assignments else ''} WHERE id = $1",
        task_id,
        status,
        *columns.values(),
    )


async def test_replay_sends_tasks_the_broker_lost_and_each_runs_once(
    pool: asyncpg.Pool,
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
) -> None:
    # A 30 s poll: only a NOTIFY wakes this relay in time, so a quick publish after the
    # replay proves the command woke it.
    relay = await ServiceProcess("relay", service_env, RELAY_POLL_INTERVAL="30").start()
    consumer: ServiceProcess | None = None
    try:
        ids = await create(pool, 40)

        async def published() -> bool:
            await pool.execute("SELECT pg_notify($1, '')", db_settings.outbox_channel)
            return (await statuses(pool, ids)) == {"PENDING": 40}

        await until(published, "40 tasks published")
        assert await queue_depth(broker_settings) == 40
        # The broker "loses" them.
        connection = await aio_pika.connect(broker_settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(broker_settings.queue_name, passive=True)
            await queue.purge()
        consumer = await ServiceProcess("consumer", service_env, **FAST_CONSUMER).start()
        await asyncio.sleep(1.0)
        assert await statuses(pool, ids) == {"PENDING": 40}, "nothing left to consume"

        looked = await replay(service_env, "--stale-for", "500ms", "--dry-run")
        assert looked.code == 0, looked
        assert sorted(listed(looked)) == sorted(ids)
        assert "selected 40, would replay 40, refused 0" in looked.stdout
        assert await statuses(pool, ids) == {"PENDING": 40}, "--dry-run changed something"

        started = time.monotonic()
        done = await replay(
            service_env, "--stale-for", "500ms", "--reason", "queue purged in a test"
        )
        assert done.code == 0, done
        assert "selected 40, replayed 40, refused 0" in done.stdout
        assert "reason recorded: 'queue purged in a test'" in done.stdout

        async def all_done() -> bool:
            return (await statuses(pool, ids)) == {"DONE": 40}

        await until(all_done, "every replayed task DONE", within=10)
        assert time.monotonic() - started < 10, "the relay waited for its poll: no NOTIFY"

        rows = await pool.fetch(
            "SELECT id, attempts, result, payload FROM tasks WHERE id = ANY($1::uuid[])", ids
        )
        assert {row["attempts"] for row in rows} == {1}, "a task ran more than once"
        assert all(row["result"] == row["payload"] for row in rows)
        kinds = await pool.fetch(
            "SELECT task_id, kind, headers, published_at FROM outbox ORDER BY id"
        )
        per_task = Counter((row["task_id"], row["kind"]) for row in kinds)
        assert set(per_task.values()) == {1}
        assert Counter(kind for _, kind in per_task) == {"task.created": 40, "task.replay": 40}
        audit = [row["headers"] for row in kinds if row["kind"] == "task.replay"]
        assert {h["why"] for h in audit} == {"queue purged in a test"}
        assert all(re.fullmatch(r".+@.+", h["who"]) for h in audit)
        assert all(datetime.fromisoformat(h["at"]).tzinfo is not None for h in audit)
        (trace_id,) = {h["traceparent"].split("-")[1] for h in audit}
        assert f"trace id {trace_id}" in done.stdout
        assert all(row["published_at"] is not None for row in kinds)

        # Nothing is stale any more: a second run finds nothing and succeeds.
        again = await replay(service_env, "--stale-for", "500ms", "--reason", "again")
        assert again.code == 0, again
        assert "selected 0, replayed 0, refused 0" in again.stdout
    finally:
        for proc in (consumer, relay):
            if proc is not None:
                proc.kill()
                await proc.wait()


async def test_replay_refuses_by_status_and_force_widens_it(
    pool: asyncpg.Pool, service_env: dict[str, str]
) -> None:
    new, pending, processing, done, failed, cancelled = await create(pool, 6)
    await set_status(pool, pending, "PENDING")
    await set_status(pool, processing, "PROCESSING", attempts=1, heartbeat_at=datetime.now(UTC))
    await set_status(
        pool, done, "DONE", attempts=1, result={"ok": 1}, finished_at=datetime.now(UTC)
    )
    await set_status(
        pool,
        failed,
        "FAILED",
        attempts=3,
        error={"type": "Boom", "message": "no"},
        finished_at=datetime.now(UTC),
    )
    await set_status(pool, cancelled, "CANCELLED", finished_at=datetime.now(UTC))
    everything = [new, pending, processing, done, failed, cancelled]
    ids = [arg for task_id in everything for arg in ("--task-id", str(task_id))]
    before = await pool.fetch("SELECT * FROM tasks ORDER BY id")

    looked = await replay(service_env, *ids, "--dry-run")
    assert looked.code == 1, looked  # some would be refused
    assert sorted(listed(looked)) == sorted(everything)
    for task_id, action in [
        (pending, "yes"),
        (failed, "yes"),
        (new, "no, already waiting for the relay"),
        (processing, "no, a consumer runs it now; never replayed"),
        (done, "no, finished; pass --force"),
        (cancelled, "no, cancelled; pass --force"),
    ]:
        (line,) = [ln for ln in looked.stdout.splitlines() if ln.startswith(str(task_id))]
        assert line.split("  ")[-1].strip().startswith(action), line
    assert "selected 6, would replay 2, refused 4" in looked.stdout
    assert await pool.fetch("SELECT * FROM tasks ORDER BY id") == before

    first = await replay(service_env, *ids, "--reason", "drill")
    assert first.code == 1, first
    assert "selected 6, replayed 2, refused 4" in first.stdout
    assert "refused 1 — PROCESSING: a consumer runs it now; never replayed" in first.stdout
    assert "refused 1 — DONE: finished; pass --force to run it again" in first.stdout
    assert f"{processing}  PROCESSING" in first.stdout  # the refused are listed by id
    row = await pool.fetchrow("SELECT * FROM tasks WHERE id = $1", failed)
    assert row is not None
    # Back to NEW for the relay, the attempt count kept (a fencing token), one more allowed.
    assert (row["status"], row["attempts"], row["max_attempts"]) == ("NEW", 3, 4)
    assert (row["error"], row["finished_at"]) == (None, None)
    replayed = await pool.fetch(
        "SELECT task_id FROM outbox WHERE kind = 'task.replay' ORDER BY task_id"
    )
    assert {r["task_id"] for r in replayed} == {pending, failed}

    forced = await replay(service_env, *ids, "--reason", "drill", "--force")
    assert forced.code == 1, forced  # PROCESSING, and the NEW ones, still refused
    assert "selected 6, replayed 2, refused 4" in forced.stdout
    assert "refused 3 — NEW: already waiting" in forced.stdout
    assert "refused 1 — PROCESSING" in forced.stdout
    row = await pool.fetchrow("SELECT * FROM tasks WHERE id = $1", done)
    assert row is not None
    assert (row["status"], row["result"], row["finished_at"]) == ("NEW", None, None)
    assert await statuses(pool, everything) == {"NEW": 5, "PROCESSING": 1}


async def test_replay_runs_in_chunks_with_progress(
    pool: asyncpg.Pool, service_env: dict[str, str]
) -> None:
    ids = await create(pool, 1100)
    await pool.execute("UPDATE tasks SET status = 'FAILED', attempts = 3")
    result = await replay(
        service_env, "--status", "FAILED", "--chunk-size", "500", "--reason", "chunks"
    )
    assert result.code == 0, result
    progress = [line for line in result.stderr.splitlines() if line.startswith("replay: ")]
    assert progress == [
        "replay: 500/1,100 (45%), replayed 500, refused 0",
        "replay: 1,000/1,100 (90%), replayed 1,000, refused 0",
        "replay: 1,100/1,100 (100%), replayed 1,100, refused 0",
    ]
    assert "selected 1,100, replayed 1,100, refused 0" in result.stdout
    # One transaction per chunk: the rows of a chunk share its transaction's now().
    per_transaction = await pool.fetch(
        "SELECT created_at, count(*) AS n FROM outbox WHERE kind = 'task.replay' "
        "GROUP BY created_at ORDER BY created_at"
    )
    assert [row["n"] for row in per_transaction] == [500, 500, 100]
    assert await statuses(pool, ids) == {"NEW": 1100}


async def test_replay_selection_flags(pool: asyncpg.Pool, service_env: dict[str, str]) -> None:
    alphas = await create(pool, 4, "alpha")
    betas = await create(pool, 4, "beta")
    everything = alphas + betas
    await pool.execute("UPDATE tasks SET status = 'PENDING'")
    # Creation times an hour apart, oldest first: alphas[0] .. betas[3].
    base = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    for i, task_id in enumerate(everything):
        await pool.execute(
            "UPDATE tasks SET created_at = $2 WHERE id = $1", task_id, base + timedelta(hours=i)
        )
    outbox_of = {
        row["task_id"]: row["id"] for row in await pool.fetch("SELECT id, task_id FROM outbox")
    }

    async def selected(*args: str) -> list[uuid.UUID]:
        result = await replay(service_env, *args, "--dry-run")
        assert result.code == 0, result
        return listed(result)

    assert await selected("--type", "beta") == betas
    assert await selected("--type", "beta", "--limit", "2") == betas[:2]
    assert await selected("--status", "PENDING", "--limit", "3") == alphas[:3]
    low, high = outbox_of[alphas[2]], outbox_of[betas[1]]
    assert await selected("--outbox-id", f"{low}..{high}") == [*alphas[2:], *betas[:2]]
    assert await selected("--outbox-id", str(outbox_of[betas[3]])) == [betas[3]]
    assert (
        await selected("--since", "2024-05-01T10:00", "--until", "2024-05-01T12:00:00+00:00")
        == alphas[2:4]
    )
    assert await selected("--until", "2024-05-01T10:30+02:00") == alphas[:1]  # 08:30 UTC
    assert await selected("--stale-for", "1h") == []  # updated just now
    assert await selected("--type", "alpha", "--type", "beta") == betas  # the last one wins

    missing = uuid.uuid4()
    result = await replay(
        service_env, "--task-id", str(missing), "--task-id", str(alphas[0]), "--dry-run"
    )
    assert result.code == 1, result
    assert listed(result) == [alphas[0]]
    assert "selected 2, would replay 1, refused 1" in result.stdout
    assert "refused 1 — no such task" in result.stdout


async def test_a_task_that_changes_between_selection_and_replay_is_refused(
    pool: asyncpg.Pool,
) -> None:
    stays, claimed = await create(pool, 2)
    await pool.execute("UPDATE tasks SET status = 'PENDING'")
    # A consumer claims one after the operator selected both.
    await set_status(pool, claimed, "PROCESSING", attempts=1)
    async with pool.acquire() as conn:
        result = await store.replay_chunk(
            conn, [stays, claimed], {"who": "t", "why": "race"}, force=True
        )
    assert set(result.replayed) == {stays}
    assert result.refused == {claimed: "PROCESSING"}
    rows = await pool.fetch("SELECT task_id FROM outbox WHERE kind = 'task.replay'")
    assert [row["task_id"] for row in rows] == [stays]


@pytest.mark.parametrize("flag", ["--dry-run", "--reason=x"])
async def test_replay_reports_an_unreachable_database(
    service_env: dict[str, str], unreachable_env: dict[str, str], flag: str
) -> None:
    result = await replay(unreachable_env, "--status", "FAILED", flag)
    assert result.code == 1, result
    assert "cannot reach Postgres at DATABASE_URL" in result.stderr


@pytest.fixture
def unreachable_env(service_env: dict[str, str]) -> dict[str, str]:
    from tests.integration.processes import free_port

    return {
        **service_env,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/nothing",
        "DB_CONNECT_TIMEOUT": "2",
    }
