"""The handler API through a real consumer process: a sync handler runs in the thread
pool without stalling the event loop, and Retry(in_seconds) delays the next attempt."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import pytest

from tests.integration.test_consumer import (
    Stack,
    eventually,
    fetch_task,
    new_task,
    stop_cleanly,
    wait_status,
)

HANDLER_API = {"TASK_MODULES": "tests.integration.handler_api"}


@pytest.fixture
async def stack(service_env: dict[str, str]) -> AsyncIterator[Stack]:
    procs = Stack(service_env)
    yield procs
    await procs.close()


async def heartbeats(pool: asyncpg.Pool, task_ids: list[uuid.UUID]) -> tuple[datetime | None, ...]:
    rows = await pool.fetch(
        "SELECT id, heartbeat_at FROM tasks WHERE id = ANY($1::uuid[])", task_ids
    )
    by_id = {row["id"]: row["heartbeat_at"] for row in rows}
    return tuple(by_id[task_id] for task_id in task_ids)


async def test_a_sync_handler_in_time_sleep_leaves_the_event_loop_free(
    pool: asyncpg.Pool, stack: Stack
) -> None:
    await stack.relay()
    consumer = await stack.consumer(**HANDLER_API, HANDLER_THREADS="2")
    other = await new_task(pool, "sleep", {"seconds": 5})
    await wait_status(pool, other, "PROCESSING", stack=stack)
    blocking = await new_task(pool, "blocking-nap", {"seconds": 3})
    await wait_status(pool, blocking, "PROCESSING", stack=stack)

    # Sampled while time.sleep(3) runs: with the loop blocked, no heartbeat would be
    # written for either task (HEARTBEAT_INTERVAL is 0.3 s).
    seen: set[tuple[datetime | None, ...]] = set()
    for _ in range(20):
        seen.add(await heartbeats(pool, [other, blocking]))
        await asyncio.sleep(0.1)
    other_beats = {beats[0] for beats in seen}
    assert len(other_beats) >= 4, f"the async task's heartbeat stalled: {other_beats}"
    assert len({beats[1] for beats in seen}) >= 4, "the sync task's heartbeat stalled"

    done = await wait_status(pool, blocking, "DONE", "FAILED", stack=stack)
    assert done["status"] == "DONE", done["error"]
    assert done["result"] == {"slept": 3}
    assert (await wait_status(pool, other, "DONE", "FAILED", stack=stack))["status"] == "DONE"
    await stop_cleanly(consumer)


async def test_retry_in_seconds_starts_the_second_attempt_no_earlier_than_asked(
    pool: asyncpg.Pool, stack: Stack
) -> None:
    await stack.relay()
    await stack.consumer(**HANDLER_API)
    task_id = await new_task(pool, "retry-later", {"in_seconds": 2.0})

    first = await eventually(
        lambda: fetch_task(pool, task_id),
        lambda row: row["attempts"] >= 1 and row["error"] is not None,
        "the first attempt to ask for a retry",
        stack=stack,
    )
    assert first["error"]["type"] == "Retry"
    asked_at = float(first["error"]["message"])

    done = await wait_status(pool, task_id, "DONE", "FAILED", stack=stack)
    assert done["status"] == "DONE", done["error"]
    assert done["attempts"] == 2
    waited = done["result"]["started"] - asked_at
    assert 2.0 <= waited < 6.0, f"the second attempt started {waited:.2f}s after the retry"
