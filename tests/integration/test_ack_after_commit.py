"""The consumer acks a message only once its task's outcome is committed, shown without
any failpoint: the test holds the task row's lock so that the outcome's commit cannot
finish, and kills the consumer while it waits.

Were the ack sent before the commit, the broker would have dropped the message by then
and a kill would lose the task's only delivery. Since it is sent after, the broker puts
the message back, and another consumer runs the task to DONE.
"""

from __future__ import annotations

import uuid
from typing import TypeVar

import asyncpg

from taskbox.broker.settings import BrokerSettings
from taskbox.db.tasks import NewTask, create_task
from tests.integration.helpers_broker import queue_depth
from tests.integration.processes import ServiceProcess
from tests.integration.test_consumer import eventually

T = TypeVar("T")

# The first consumer never heartbeats during the test, so that the only statement of
# its that can wait on the test's row lock is the outcome's commit (the rescue skips
# locked rows). The second one has short timings, so that it takes over the abandoned
# task within the test's patience.
QUIET_CONSUMER = {"HEARTBEAT_INTERVAL": "60", "TASK_STALE_AFTER": "150"}
FAST_CONSUMER = {
    "HEARTBEAT_INTERVAL": "0.3",
    "TASK_STALE_AFTER": "1.0",
    "RESCUE_INTERVAL": "0.3",
}
HANDLER_SECONDS = 1.0  # long enough to lock the row while the handler runs

# Backends of this database waiting for a lock the given backend holds.
_BLOCKED_BY = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND $1 = ANY(pg_blocking_pids(pid))
"""


async def test_a_message_is_not_acked_while_its_outcome_commit_waits(
    pool: asyncpg.Pool,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
    processes: list[ServiceProcess],
) -> None:
    async def start(module: str, **env: str) -> ServiceProcess:
        proc = ServiceProcess(module, service_env, **env)
        processes.append(proc)
        return await proc.start()

    async def task_row() -> asyncpg.Record:
        row = await pool.fetchrow(
            "SELECT status, attempts, result, heartbeat_at FROM tasks WHERE id = $1", task_id
        )
        assert row is not None
        return row

    await start("relay", RELAY_POLL_INTERVAL="0.2")
    doomed = await start("consumer", **QUIET_CONSUMER)
    created = await create_task(pool, NewTask("sleep", {"seconds": HANDLER_SECONDS}, 0, 3))
    task_id: uuid.UUID = created["id"]
    await eventually(task_row, lambda r: r["status"] == "PROCESSING", "the claim", 10)

    async with pool.acquire() as locker:
        locker_pid = await locker.fetchval("SELECT pg_backend_pid()")
        lock = locker.transaction()
        await lock.start()
        try:
            # The claim is committed; the outcome is not and, from here, cannot be.
            locked = await locker.fetchrow(
                "SELECT status FROM tasks WHERE id = $1 FOR UPDATE", task_id
            )
            assert locked is not None
            assert locked["status"] == "PROCESSING", "the handler finished before the lock"

            # The handler finishes and the consumer's outcome statement queues behind
            # the lock: the moment at which a premature ack would already have been sent.
            blocked = await eventually(
                lambda: pool.fetch(_BLOCKED_BY, locker_pid),
                lambda rows: len(rows) > 0,
                "the consumer's outcome commit to wait on the row lock",
                HANDLER_SECONDS + 5,
            )
            doomed.kill()
            assert await doomed.wait() == -9
            # Its connection is gone, so the broker requeues what it had not acked: the
            # message is back, ready, and the commit never happened.
            await eventually(
                lambda: queue_depth(broker_settings),
                lambda n: n == 1,
                "the unacked message to be back in the queue after the kill",
                5,
            )
            assert (await task_row())["status"] == "PROCESSING"
            # The dead consumer's statement still waits in its backend; end it, so that
            # it cannot commit a late outcome when the lock goes.
            for row in blocked:
                await pool.execute("SELECT pg_terminate_backend($1)", row["pid"])
            await eventually(
                lambda: pool.fetch(_BLOCKED_BY, locker_pid),
                lambda rows: rows == [],
                "the dead consumer's backend to end",
                5,
            )
        finally:
            await lock.rollback()
    abandoned = await task_row()
    assert (abandoned["status"], abandoned["attempts"], abandoned["result"]) == (
        "PROCESSING",
        1,
        None,
    )

    # Another consumer gets the redelivered message, takes over the abandoned task
    # (its heartbeat is stale) and runs it: the task is not lost.
    await start("consumer", **FAST_CONSUMER)
    done = await eventually(task_row, lambda r: r["status"] == "DONE", "the task to be DONE", 10)
    assert done["result"] == {"slept": HANDLER_SECONDS}
    assert done["attempts"] == 2, "the first attempt's outcome was never committed"
    # Whatever else was sent for it (a rescue's retry row, if the rescue came first) is
    # published and dropped as a duplicate: the task ran to DONE once and stays so.
    await eventually(
        lambda: pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"),
        lambda n: n == 0,
        "every outbox row to be published",
        5,
    )
    await eventually(
        lambda: queue_depth(broker_settings), lambda n: n == 0, "the queue to drain", 5
    )
    assert await queue_depth(broker_settings, broker_settings.dead_letter_queue) == 0
    assert await task_row() == done
