"""A Postgres crash under load loses no task that the api answered 201 for, and leaves
none stuck; a claim answered before the crash survives it.

Which commits wait for their WAL flush is a durability decision (README, Guarantees):
the api's create, the consumer's claim and every outcome do; the relay's record of its
confirms does not (synchronous_commit off: losing it is a duplicate). This test holds the
decision to what it promises: the api, a relay and a consumer run against a cluster of
the test's own, tasks are created over HTTP at a steady rate, and the cluster is
stopped with ``pg_ctl stop -m immediate`` (nothing flushed that was not already) while
messages, claims and outcomes are in flight, then started again. Every 201's task must
then reach DONE. A create committed without its flush would be missing after the
crash; a mark-published whose loss could lose a task would leave one stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from taskbox.broker.settings import BrokerSettings
from taskbox.db import execution
from taskbox.db.pool import init_connection
from taskbox.db.tasks import NewTask, create_task
from tests.faults.cluster import FAST_CONSUMER, FAST_RELAY
from tests.faults.load import accepted, create_at_a_steady_rate, refused_wrongly
from tests.faults.own_postgres import OwnPostgres
from tests.integration.processes import ServiceProcess, free_port, run_command

pytestmark = pytest.mark.integration

RATE = 150  # creates a second
CRASH_AFTER = 2.0  # seconds of load before the crash
DOWN_FOR = 1.0
LOAD_FOR = 6.0  # seconds of load in all, the crash and restart included


@pytest.fixture
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    cluster = OwnPostgres()
    try:
        await asyncio.to_thread(cluster.create)
        yield cluster
    finally:
        await asyncio.to_thread(cluster.destroy)


async def test_a_postgres_crash_loses_no_accepted_task_and_strands_none(
    own_postgres: OwnPostgres, broker_settings: BrokerSettings
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TASKBOX_FAILPOINTS"}
    env.update(
        DATABASE_URL=own_postgres.url,
        AMQP_URL=broker_settings.amqp_url,
        EXCHANGE_NAME=broker_settings.exchange_name,
        QUEUE_NAME=broker_settings.queue_name,
        DEAD_LETTER_EXCHANGE=broker_settings.dead_letter_exchange,
        DEAD_LETTER_QUEUE=broker_settings.dead_letter_queue,
        PYTHONUNBUFFERED="1",
    )
    migrated = await run_command("db", ["migrate"], env)
    assert migrated.code == 0, migrated
    port = free_port()
    processes = [
        await ServiceProcess("api", env, API_PORT=str(port), API_ACCESS_LOG="false").start(),
        await ServiceProcess("relay", env, **FAST_RELAY).start(),
        await ServiceProcess("consumer", env, **FAST_CONSUMER).start(),
    ]
    try:
        started = time.monotonic()
        load = asyncio.create_task(
            create_at_a_steady_rate(f"http://127.0.0.1:{port}", RATE, started + LOAD_FOR)
        )
        await asyncio.sleep(CRASH_AFTER)
        await asyncio.to_thread(own_postgres.crash)
        await asyncio.sleep(DOWN_FOR)
        await asyncio.to_thread(own_postgres.start)
        answers = await load
        # the crash: a 503, never anything else
        assert refused_wrongly(answers) == [], refused_wrongly(answers)[:3]
        ids = accepted(answers)
        # (how many of the later ones the api took depends on how soon its pool is back)
        assert len(ids) > RATE * CRASH_AFTER / 2, "too few creates to mean much"

        conn = await asyncpg.connect(own_postgres.url)
        try:
            deadline = time.monotonic() + 60
            while True:
                rows = await conn.fetch("SELECT id, status FROM tasks")
                status = {row["id"]: row["status"] for row in rows}
                lost = [task_id for task_id in ids if task_id not in status]
                unfinished = [task_id for task_id, s in status.items() if s != "DONE"]
                if lost or not unfinished or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        finally:
            await conn.close()
        print(
            f"postgres crash: {len(ids)} tasks accepted, lost={len(lost)} "
            f"stuck={len(unfinished)} (of {len(status)} in the database)"
        )
        assert lost == [], f"{len(lost)} tasks answered 201 are gone after the crash"
        assert unfinished == [], f"{len(unfinished)} tasks never finished: {unfinished[:5]}"
    finally:
        for process in reversed(processes):
            process.kill()
        for process in processes:
            with contextlib.suppress(Exception):
                await process.wait(timeout=10)


# The server processes that could write or flush the WAL the claim's commit left in
# shared memory; stopped, nothing does until the kill.
_WAL_WRITERS = """
SELECT pid FROM pg_stat_activity
WHERE backend_type IN ('walwriter', 'background writer', 'checkpointer', 'autovacuum launcher')
"""
_ROW = "SELECT status, lease, attempts, worker_id FROM tasks WHERE id = $1"


async def test_a_claim_answered_survives_a_crash(
    own_postgres: OwnPostgres, broker_settings: BrokerSettings
) -> None:
    """The claim waits for its flush (README, Guarantees): other consumers act on it (a
    copy of the message is acked as a duplicate of a task running elsewhere), so a claim
    lost after its answer could strand the task. With every process that could flush
    the WAL stopped, a claim that did not wait would be gone after the kill."""
    env = {**os.environ, "DATABASE_URL": own_postgres.url}
    migrated = await run_command("db", ["migrate"], env)
    assert migrated.code == 0, migrated
    conn = await asyncpg.connect(own_postgres.url)
    await init_connection(conn)  # jsonb as the pool has it
    try:
        task = await create_task(conn, NewTask("echo", {"n": 1}, 0, 3))
        outbox_id = await conn.fetchval("SELECT id FROM outbox WHERE task_id = $1", task["id"])
        delivery = execution.Delivery(task["id"], outbox_id)
        for pid in [row["pid"] for row in await conn.fetch(_WAL_WRITERS)]:
            os.kill(pid, signal.SIGSTOP)
        [claimed] = await execution.claim_tasks(conn, [delivery], "w1", 30.0)
        assert claimed["claimed"]
        # What another consumer makes of a copy of the message: a duplicate to ack.
        [copy] = await execution.claim_tasks(conn, [delivery], "w2", 30.0)
        assert (copy["claimed"], copy["seen_status"]) == (False, "PROCESSING")
    finally:
        await conn.close()
    await asyncio.to_thread(own_postgres.kill_and_restart)  # the stopped ones too: SIGKILL

    conn = await asyncpg.connect(own_postgres.url)
    try:
        row = await conn.fetchrow(_ROW, task["id"])
        assert row is not None, "the create waited for its flush: it must survive"
        assert (row["status"], row["lease"], row["worker_id"]) == (
            "PROCESSING",
            claimed["lease"],
            "w1",
        ), f"the claim was lost in the crash after w2 acked its copy: {dict(row)}"
    finally:
        await conn.close()
