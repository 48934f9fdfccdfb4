"""Retention against the real Postgres: what a sweep deletes and keeps, that only one
process sweeps at a time, ``python -m relay cleanup``, and the relay's own loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import pytest

from taskbox.db import retention
from taskbox.db import webhooks as webhook_store
from taskbox.db.pool import connect
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, create_task
from taskbox.relay.housekeeping import Housekeeper, sweep
from taskbox.relay.metrics import RelayMetrics
from taskbox.relay.settings import RelaySettings
from taskbox.webhooks import new_secret
from tests.integration.processes import ServiceProcess, run_command

DAY = 86400.0


@pytest.fixture
def settings(db_settings: DatabaseSettings) -> RelaySettings:
    return RelaySettings(
        database_url=db_settings.database_url,
        outbox_channel=db_settings.outbox_channel,
        outbox_retention=7 * DAY,
        task_retention=None,
        retention_batch=10,
        _env_file=None,
    )


async def make_tasks(pool: asyncpg.Pool, count: int) -> list[uuid.UUID]:
    async with pool.acquire() as conn, conn.transaction():
        return [
            (
                await create_task(
                    conn, NewTask(type="echo", payload={"i": i}, priority=0, max_attempts=3)
                )
            )["id"]
            for i in range(count)
        ]


async def age(
    pool: asyncpg.Pool,
    task_ids: list[uuid.UUID],
    *,
    days: float,
    published: bool = True,
    status: str | None = None,
    finished: bool = False,
) -> None:
    """Make these tasks and their outbox rows look ``days`` old."""
    then = f"now() - make_interval(secs => {days * DAY})"
    await pool.execute(
        f"UPDATE outbox SET created_at = {then}, available_at = {then}, "
        f"published_at = {then if published else 'NULL'} WHERE task_id = ANY($1::uuid[])",
        task_ids,
    )
    if status is not None:
        await pool.execute(
            f"UPDATE tasks SET status = $2, created_at = {then}, "
            f"finished_at = {then if finished else 'NULL'} WHERE id = ANY($1::uuid[])",
            task_ids,
            status,
        )


async def outbox_task_ids(pool: asyncpg.Pool) -> set[uuid.UUID]:
    return {row["task_id"] for row in await pool.fetch("SELECT task_id FROM outbox")}


async def task_ids(pool: asyncpg.Pool) -> set[uuid.UUID]:
    return {row["id"] for row in await pool.fetch("SELECT id FROM tasks")}


async def test_a_sweep_deletes_old_published_rows_only(
    pool: asyncpg.Pool, settings: RelaySettings
) -> None:
    old = await make_tasks(pool, 35)  # more than three batches of 10
    await age(pool, old, days=8)
    recent = await make_tasks(pool, 5)
    await age(pool, recent, days=1)
    stuck = await make_tasks(pool, 3)
    await age(pool, stuck, days=30, published=False)  # never published: kept, however old
    newest = await make_tasks(pool, 2)  # created now, unpublished
    metrics = RelayMetrics()

    async with pool.acquire() as conn:
        report = await sweep(conn, settings, metrics)
    assert (report.outbox_deleted, report.tasks_deleted) == (35, 0)
    assert await outbox_task_ids(pool) == {*recent, *stuck, *newest}
    assert await task_ids(pool) == {*old, *recent, *stuck, *newest}, "tasks are kept"
    assert metrics.retention_deleted.labels("outbox")._value.get() == 35

    async with pool.acquire() as conn:
        again = await sweep(conn, settings)
    assert again.outbox_deleted == 0


async def test_a_sweep_forgets_consumers_gone_for_a_day(
    pool: asyncpg.Pool, settings: RelaySettings
) -> None:
    await pool.execute(
        "INSERT INTO queue_consumers (queue, consumer, seen_at) VALUES "
        "('media', 'gone', now() - interval '25 hours'), "
        "('media', 'quiet', now() - interval '23 hours'), ('default', 'live', now())"
    )
    async with pool.acquire() as conn:
        await sweep(conn, settings)
    left = await pool.fetch("SELECT consumer FROM queue_consumers ORDER BY consumer")
    assert [row["consumer"] for row in left] == ["live", "quiet"]


async def test_a_row_published_late_is_deleted_after_the_retention_from_its_publish(
    pool: asyncpg.Pool, settings: RelaySettings
) -> None:
    (task,) = await make_tasks(pool, 1)
    # Created 10 days ago, published only 2 days ago (it waited out a long outage).
    await pool.execute(
        "UPDATE outbox SET created_at = now() - interval '10 days', "
        "published_at = now() - interval '2 days'"
    )
    async with pool.acquire() as conn:
        assert (await sweep(conn, settings)).outbox_deleted == 0
    assert await outbox_task_ids(pool) == {task}


async def test_task_retention_deletes_finished_tasks_with_their_outbox_rows(
    pool: asyncpg.Pool, settings: RelaySettings
) -> None:
    finished = []
    for status in ("DONE", "FAILED", "CANCELLED"):
        ids = await make_tasks(pool, 12)
        await age(pool, ids, days=40, status=status, finished=True)
        finished += ids
    running = await make_tasks(pool, 2)
    await age(pool, running, days=40, status="PROCESSING")
    waiting = await make_tasks(pool, 2)
    await age(pool, waiting, days=40, status="PENDING")
    young = await make_tasks(pool, 2)
    await age(pool, young, days=3, status="DONE", finished=True)
    # A task created long ago that finished recently is not old yet.
    slow = await make_tasks(pool, 1)
    await age(pool, slow, days=40, status="DONE", finished=True)
    await pool.execute(
        "UPDATE tasks SET finished_at = now() - interval '1 day' WHERE id = $1", slow[0]
    )

    async with pool.acquire() as conn:
        kept = await sweep(conn, settings)  # TASK_RETENTION unset: tasks stay
    assert kept.tasks_deleted == 0
    assert len(await task_ids(pool)) == 36 + 7

    settings = settings.model_copy(update={"task_retention": 30 * DAY})
    async with pool.acquire() as conn:
        report = await sweep(conn, settings)
    assert report.tasks_deleted == 36
    assert await task_ids(pool) == {*running, *waiting, *young, *slow}
    assert not (await outbox_task_ids(pool)) & set(finished), "outbox rows cascade"


async def test_task_retention_keeps_tasks_whose_webhook_delivery_is_pending(
    pool: asyncpg.Pool, settings: RelaySettings
) -> None:
    """A delivery cascades with its task: a task whose delivery is still pending stays
    (the receiver has not heard of it yet); delivered or failed ones go."""
    await webhook_store.create_webhook(
        pool, webhook_store.Subscription("http://127.0.0.1:9/hook", ("task.done",)), new_secret()
    )
    ids = await make_tasks(pool, 12)  # more than a batch of 10
    await age(pool, ids, days=40, status="DONE", finished=True)  # the trigger enqueues
    pending = {ids[0], ids[5], ids[11]}
    await pool.execute(
        "UPDATE webhook_deliveries SET status = CASE WHEN random() < 0.5 THEN 'delivered'"
        " ELSE 'failed' END WHERE NOT task_id = ANY($1::uuid[])",
        list(pending),
    )
    settings = settings.model_copy(update={"task_retention": 30 * DAY})
    async with pool.acquire() as conn:
        report = await sweep(conn, settings)
    assert report.tasks_deleted == 9
    assert await task_ids(pool) == pending
    left = await pool.fetch("SELECT task_id, status FROM webhook_deliveries")
    assert {(r["task_id"], r["status"]) for r in left} == {(t, "pending") for t in pending}


async def test_only_one_process_sweeps_at_a_time(
    pool: asyncpg.Pool, settings: RelaySettings, db_settings: DatabaseSettings
) -> None:
    old = await make_tasks(pool, 5)
    await age(pool, old, days=8)
    keeper = Housekeeper(settings, RelayMetrics())
    other = await connect(db_settings)  # another relay, mid-sweep
    try:
        assert await retention.try_lock(other)
        assert await keeper.sweep_if_free() is None
        assert await outbox_task_ids(pool) == set(old), "swept while the lock was held"
        await retention.unlock(other)
        report = await keeper.sweep_if_free()
        assert report is not None
        assert report.outbox_deleted == 5
        # The sweeper let go of the lock: the other one can take it again.
        assert await retention.try_lock(other)
    finally:
        await other.close()


async def test_cleanup_command(
    pool: asyncpg.Pool, db_settings: DatabaseSettings, service_env: dict[str, str]
) -> None:
    old = await make_tasks(pool, 4)
    await age(pool, old, days=8, status="DONE", finished=True)
    env = {**service_env, "OUTBOX_RETENTION": "7d", "TASK_RETENTION": ""}

    holder = await connect(db_settings)
    try:
        assert await retention.try_lock(holder)
        running = asyncio.create_task(run_command("relay", ["cleanup"], env))
        await asyncio.sleep(1.5)
        assert not running.done(), "cleanup ran while another sweep held the lock"
        assert await outbox_task_ids(pool) == set(old)
        await retention.unlock(holder)
        result = await running
    finally:
        await holder.close()
    assert result.code == 0, result
    assert "another relay is sweeping right now; waiting for it to finish" in result.stdout
    assert "deleted 4 published outbox rows older than 7d (OUTBOX_RETENTION)" in result.stdout
    assert "kept every finished task (TASK_RETENTION is not set)" in result.stdout
    assert await task_ids(pool) == set(old)

    result = await run_command("relay", ["cleanup"], {**env, "TASK_RETENTION": "1w"})
    assert result.code == 0, result
    assert "deleted 4 finished tasks older than 7d (TASK_RETENTION)" in result.stdout
    assert await task_ids(pool) == set()

    result = await run_command("relay", ["cleanup"], {**env, "OUTBOX_RETENTION": "soon"})
    assert result.code == 2, result
    assert "invalid setting OUTBOX_RETENTION='soon': 'soon' is not a duration" in result.stderr


async def test_the_relay_sweeps_on_its_own(pool: asyncpg.Pool, service_env: dict[str, str]) -> None:
    old = await make_tasks(pool, 3)
    await age(pool, old, days=2)
    relay = await ServiceProcess(
        "relay", service_env, RETENTION_INTERVAL="0.3", OUTBOX_RETENTION="1d"
    ).start()
    try:
        deadline = time.monotonic() + 15

        async def remaining() -> set[Any]:
            return await outbox_task_ids(pool)

        while await remaining():
            assert time.monotonic() < deadline, relay.output
            await asyncio.sleep(0.1)
        await relay.wait_for("retention: deleted 3 published outbox rows and 0 finished tasks")
    finally:
        relay.kill()
        await relay.wait()
