"""What the cluster fault tests measure: a steady stream of tasks over HTTP, the moments
publishing made progress, and the final count of what was lost, stuck or finished twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from dataclasses import dataclass, field

import asyncpg
import httpx

from tests.faults.cluster import STALE_WRITES, TERMINAL, TERMINAL_WRITTEN_TWICE


@dataclass
class Load:
    """Creates echo tasks at ``rate`` per second until stopped; keeps every id answered 201."""

    base_url: str
    rate: float
    acknowledged: list[uuid.UUID] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # any answer but 201
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        interval = 1.0 / self.rate
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as client:
            n = 0
            next_at = time.monotonic()
            while not self._stop.is_set():
                n += 1
                try:
                    answer = await client.post(
                        "/api/v1/tasks", json={"type": "echo", "payload": {"n": n}}
                    )
                except httpx.HTTPError as exc:
                    self.refused.append(f"{type(exc).__name__}: {exc}")
                else:
                    if answer.status_code == 201:
                        self.acknowledged.append(uuid.UUID(answer.json()["id"]))
                    else:
                        self.refused.append(f"{answer.status_code} {answer.text[:200]}")
                next_at += interval
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_at - time.monotonic())):
                        await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


# Rows a relay published (confirmed, then committed). Not the rows it closed unsent
# because their task had finished (published_at set, with last_error saying so): a
# relay closes those without RabbitMQ, so they would show progress with no broker.
PUBLISHED = "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL AND last_error IS NULL"


@dataclass
class PublishWatch:
    """The moments (time.monotonic()) at which the count of published outbox rows grew:
    each one a relay's batch committed after RabbitMQ confirmed it."""

    pool: asyncpg.Pool
    every: float = 0.05
    progress: list[float] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        last = -1
        while not self._stop.is_set():
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                count = await self.pool.fetchval(PUBLISHED)
                if count != last:
                    if last >= 0:
                        self.progress.append(time.monotonic())
                    last = count
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.every):
                    await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    async def resumed(self, after: float, within: float) -> float:
        """Wait for a publish later than ``after``; its moment. AssertionError when
        none comes ``within`` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            later = [t for t in self.progress if t > after]
            if later:
                return later[0]
            await asyncio.sleep(self.every)
        raise AssertionError(f"no publish within {within}s")

    def stall_after(self, start: float, end: float) -> tuple[float, float]:
        """From ``start`` (a fault) to ``end``: the longest time without a publish, and
        when (seconds after ``start``) publishing resumed at its end."""
        moments = [t for t in self.progress if start <= t <= end]
        edges = [start, *moments]
        if not moments:
            return end - start, float("inf")
        gaps = [(b - a, b) for a, b in itertools.pairwise(edges)]
        longest, resumed_at = max(gaps)
        return longest, resumed_at - start


@dataclass(frozen=True)
class Outcome:
    acknowledged: int
    lost: list[uuid.UUID]
    stuck: dict[uuid.UUID, str]
    committed_twice: list[asyncpg.Record]
    stale_writes: list[asyncpg.Record]
    done: int

    def line(self) -> str:
        return (
            f"tasks={self.acknowledged} done={self.done} lost={len(self.lost)} "
            f"stuck={len(self.stuck)} results_committed_twice={len(self.committed_twice)} "
            f"stale_writes={len(self.stale_writes)}"
        )

    @property
    def clean(self) -> bool:
        return not (self.lost or self.stuck or self.committed_twice or self.stale_writes)


async def statuses(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    rows = await pool.fetch("SELECT id, status FROM tasks WHERE id = ANY($1::uuid[])", ids)
    return {row["id"]: row["status"] for row in rows}


async def all_terminal(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> int:
    """How many of ``ids`` are not terminal yet (a missing one counts)."""
    found = await statuses(pool, ids)
    return sum(1 for task_id in ids if found.get(task_id) not in TERMINAL)


async def outcome(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> Outcome:
    found = await statuses(pool, ids)
    with_event = {
        row["task_id"]
        for row in await pool.fetch(
            "SELECT DISTINCT task_id FROM outbox WHERE task_id = ANY($1::uuid[])", ids
        )
    }
    lost = [task_id for task_id in ids if task_id not in found or task_id not in with_event]
    stuck = {t: s for t, s in found.items() if s not in TERMINAL}
    return Outcome(
        acknowledged=len(ids),
        lost=lost,
        stuck=stuck,
        committed_twice=await pool.fetch(TERMINAL_WRITTEN_TWICE),
        stale_writes=await pool.fetch(STALE_WRITES),
        done=sum(1 for s in found.values() if s == "DONE"),
    )
