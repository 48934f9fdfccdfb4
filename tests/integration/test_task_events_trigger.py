"""Migration 0008's trigger: one NOTIFY per status-changing statement, on every path."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from taskbox.db import execution
from taskbox.db import tasks as task_store
from taskbox.db.states import TaskStatus
from taskbox.db.task_events import CHANNEL, TaskEvent, parse_events


class Heard:
    """The notifications a LISTEN connection received, as raw payloads."""

    def __init__(self) -> None:
        self.payloads: list[str] = []
        self.arrived = asyncio.Event()

    def __call__(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self.payloads.append(payload)
        self.arrived.set()

    async def settle(self) -> list[str]:
        """What arrived, once a round trip on the listening connection proved the rest
        of the committed notifications were delivered before it."""
        await asyncio.sleep(0.05)
        taken, self.payloads = self.payloads, []
        return taken

    def events(self, payloads: list[str]) -> list[TaskEvent]:
        return [event for payload in payloads for event in parse_events(payload)]


@pytest.fixture
async def heard(database_url: str) -> AsyncIterator[Heard]:
    heard = Heard()
    conn = await asyncpg.connect(database_url)
    await conn.add_listener(CHANNEL, heard)
    try:
        yield heard
    finally:
        await conn.close()


def _echo(task_type: str) -> task_store.NewTask:
    return task_store.NewTask(type=task_type, payload={}, priority=0, max_attempts=3)


async def _create(pool: asyncpg.Pool, count: int = 1) -> list[uuid.UUID]:
    rows = await task_store.create_tasks(pool, [_echo("echo")] * count, {})
    return [row["id"] for row in rows]


async def _settle(conn_heard: Heard, pool: asyncpg.Pool) -> list[str]:
    # A NOTIFY reaches a listener after its transaction commits; a short wait on the
    # listener's side is how long delivery takes on loopback.
    await pool.execute("SELECT 1")
    return await conn_heard.settle()


async def test_an_insert_sends_nothing(pool: asyncpg.Pool, heard: Heard) -> None:
    """Creating tasks is the ingest path's own small transaction: a NOTIFY there would
    keep creates from sharing group commits (migration 0008 says why)."""
    await _create(pool, 3)
    marker = await task_store.create_task(pool, _echo("echo"))
    # Notifications arrive in commit order: once the status change committed after the
    # creates is heard, anything the creates sent would have been heard before it.
    await pool.execute("UPDATE tasks SET status = 'PENDING' WHERE id = $1", marker["id"])
    async with asyncio.timeout(10):
        await heard.arrived.wait()
    await asyncio.sleep(0.05)
    events = heard.events(heard.payloads)
    assert [(e.task_id, e.status) for e in events] == [(marker["id"], TaskStatus.PENDING)]


async def test_a_batch_update_sends_one_notification_and_only_changed_rows(
    pool: asyncpg.Pool, heard: Heard
) -> None:
    ids = await _create(pool, 50)
    await _settle(heard, pool)
    # Half the tasks change, half are already PENDING: only the changed half is sent.
    await pool.execute("UPDATE tasks SET status = 'PENDING' WHERE id = ANY($1)", ids[:25])
    await _settle(heard, pool)
    await pool.execute("UPDATE tasks SET status = 'PENDING', updated_at = now()")
    payloads = await _settle(heard, pool)
    assert len(payloads) == 1
    assert {event.task_id for event in heard.events(payloads)} == set(ids[25:])


async def test_an_update_that_leaves_the_status_sends_nothing(
    pool: asyncpg.Pool, heard: Heard
) -> None:
    [task_id] = await _create(pool)
    await pool.execute("UPDATE tasks SET status = 'PENDING' WHERE id = $1", task_id)
    claimed = await execution.claim_tasks(pool, [execution.Delivery(task_id, 1)], "w1", 30.0)
    assert claimed[0]["claimed"]
    await _settle(heard, pool)
    await execution.heartbeat(pool, [(task_id, claimed[0]["lease"])], "w1")
    assert await _settle(heard, pool) == []


async def test_the_consumers_finish_and_the_cancel_notify(pool: asyncpg.Pool, heard: Heard) -> None:
    done_id, cancelled_id = await _create(pool, 2)
    await pool.execute("UPDATE tasks SET status = 'PENDING'")
    await _settle(heard, pool)
    claimed = await execution.claim_tasks(pool, [execution.Delivery(done_id, 1)], "w1", 30.0)
    assert heard.events(await _settle(heard, pool)) == [
        TaskEvent(done_id, TaskStatus.PROCESSING, "echo", "default")
    ]
    outcome = execution.Outcome(
        task_id=done_id, attempt=1, lease=claimed[0]["lease"], status="DONE", result={"ok": True}
    )
    await execution.finish_tasks(pool, [outcome], "w1")
    assert heard.events(await _settle(heard, pool)) == [
        TaskEvent(done_id, TaskStatus.DONE, "echo", "default")
    ]
    await task_store.cancel_task(pool, cancelled_id)
    assert heard.events(await _settle(heard, pool)) == [
        TaskEvent(cancelled_id, TaskStatus.CANCELLED, "echo", "default")
    ]


async def test_a_rolled_back_change_sends_nothing(pool: asyncpg.Pool, heard: Heard) -> None:
    [task_id] = await _create(pool)
    await _settle(heard, pool)
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("UPDATE tasks SET status = 'PENDING' WHERE id = $1", task_id)
        await transaction.rollback()
    assert await _settle(heard, pool) == []


async def test_a_large_batch_is_chunked_below_the_payload_limit(
    pool: asyncpg.Pool, heard: Heard
) -> None:
    long_type = "t" * 200
    rows = await task_store.create_tasks(pool, [_echo(long_type)] * 500, {})
    await pool.execute("UPDATE tasks SET status = 'PENDING'")
    payloads = await _settle(heard, pool)
    assert 1 < len(payloads) <= 40
    assert all(len(payload.encode()) < 8000 for payload in payloads)
    assert {event.task_id for event in heard.events(payloads)} == {row["id"] for row in rows}


async def test_a_batch_of_the_widest_entries_stays_below_the_payload_limit(
    pool: asyncpg.Pool, heard: Heard
) -> None:
    """Review finding: JSON writes a control character as six bytes, so entries of 200
    such characters in type and queue overran a 6000-byte chunk bound, and the NOTIFY
    (with the whole status change) failed. Not reachable through the API, but a row
    written by hand would have stalled every flip of its batch."""
    await pool.execute(
        "INSERT INTO tasks (type, payload, queue)"
        " SELECT repeat(chr(1), i * 37 % 201), '{}', repeat(chr(1), 200)"
        " FROM generate_series(1, 1000) AS i"
    )
    await pool.execute("UPDATE tasks SET status = 'PENDING'")
    payloads = await _settle(heard, pool)
    assert all(len(payload.encode()) < 8000 for payload in payloads)
    assert len(heard.events(payloads)) == 1000
