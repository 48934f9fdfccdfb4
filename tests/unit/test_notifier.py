"""The relay wake-up: immediate after a quiet spell, throttled under load, never lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from taskbox.api.notifier import OutboxNotifier


class RecordingPool:
    """Stands in for the pool: records each NOTIFY and when it was sent."""

    def __init__(self, latency: float = 0.0, fail: bool = False) -> None:
        self.sent: list[float] = []
        self.latency = latency
        self.fail = fail

    async def execute(self, query: str, *args: Any) -> str:
        assert "pg_notify" in query
        assert args[0] == "wake"
        self.sent.append(asyncio.get_running_loop().time())
        if self.fail:
            raise OSError("connection refused")
        await asyncio.sleep(self.latency)
        return "SELECT 1"


async def test_a_lone_commit_wakes_the_relays_at_once() -> None:
    pool = RecordingPool()
    notifier = OutboxNotifier(pool, "wake", min_interval=0.05)
    start = asyncio.get_running_loop().time()
    notifier.wake()
    await notifier.close()
    assert len(pool.sent) == 1
    assert pool.sent[0] - start < 0.01


async def test_a_burst_of_commits_shares_two_wake_ups() -> None:
    pool = RecordingPool()
    notifier = OutboxNotifier(pool, "wake", min_interval=0.05)
    notifier.wake()  # leading edge: sent at once
    await asyncio.sleep(0)
    for _ in range(100):  # all within the interval: one trailing wake-up covers them
        notifier.wake()
    await asyncio.sleep(0.1)
    await notifier.close()
    assert len(pool.sent) == 2
    assert pool.sent[1] - pool.sent[0] == pytest.approx(0.05, abs=0.02)


async def test_a_commit_after_a_wake_up_left_gets_its_own() -> None:
    # The first NOTIFY is slow; a commit that lands while it is in flight may be past the
    # relay's claim already, so it must not be folded into that one.
    pool = RecordingPool(latency=0.03)
    notifier = OutboxNotifier(pool, "wake", min_interval=0.01)
    notifier.wake()
    await asyncio.sleep(0.005)  # the first is in flight now
    notifier.wake()
    await asyncio.sleep(0.1)
    await notifier.close()
    assert len(pool.sent) == 2


async def test_wake_ups_keep_the_minimum_interval_under_steady_load() -> None:
    pool = RecordingPool()
    notifier = OutboxNotifier(pool, "wake", min_interval=0.02)
    loop = asyncio.get_running_loop()
    began = loop.time()
    for _ in range(50):  # a commit every 2 ms for 100 ms (longer on a busy machine)
        notifier.wake()
        last_commit = loop.time()
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.05)
    await notifier.close()
    gaps = [b - a for a, b in zip(pool.sent, pool.sent[1:], strict=False)]
    # 50 wake-ups coalesced: at most one per 20 ms of however long the commits took
    assert 3 <= len(pool.sent) <= (last_commit - began) / 0.02 + 2
    assert min(gaps) >= 0.018
    # the last commit was covered by a wake-up sent after it
    assert pool.sent[-1] >= last_commit


async def test_a_failed_wake_up_is_logged_and_the_next_one_still_goes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = RecordingPool(fail=True)
    notifier = OutboxNotifier(pool, "wake", min_interval=0.0)
    notifier.wake()
    await notifier.close()
    notifier.wake()
    await notifier.close()
    assert len(pool.sent) == 2
    assert "outbox wake-up not sent" in caplog.text
