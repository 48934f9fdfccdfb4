"""What Postgres spends per task, from create to DONE: WAL bytes, commits, row writes
and index entries, read from the WAL itself.

``python -m bench.pg_cost [--tasks N] [--concurrency C]`` (``make bench-pg``) starts a
Postgres of its own (tests/faults/own_postgres.py: durable settings, nothing else on
it, so the WAL is Taskbox's alone), an api, a relay and a consumer against it and the
local RabbitMQ, creates N echo tasks over HTTP with C requests in flight and waits for
all of them to be DONE. ``pg_waldump --stats=record`` over the WAL the run wrote counts
its records by type: commits (Transaction/COMMIT), heap inserts and updates (HOT or
not), B-tree leaf inserts (one per index entry) and the bytes of each, full-page images
included.

It runs twice: right after a CHECKPOINT (every page touched first writes a full-page
image) and then again at once (the same pages, mostly without): what a task costs just
after a checkpoint and in between. Background work counts too (heartbeats, presence,
the relay's backlog gauge), over the few seconds of a run; retention sweeps are off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from typing import Any

import aio_pika
import asyncpg
import httpx

from bench.harness import AMQP_URL, ROOT, Process, taskbox, wait_until
from tests.faults.own_postgres import OwnPostgres
from tests.integration.processes import free_port

# pg_waldump --stats=record: "Heap/HOT_UPDATE   N (pct)   record bytes (pct)   fpi bytes
# (pct)   combined bytes (pct)"
_STAT_LINE = re.compile(
    r"^(?P<type>\S+/\S+)\s+(?P<n>\d+)\s+\(\s*[\d.]+\)\s+(?P<record>\d+)\s+\(\s*[\d.]+\)"
    r"\s+(?P<fpi>\d+)\s+\(\s*[\d.]+\)\s+(?P<combined>\d+)"
)


def wal_stats(pg: OwnPostgres, start: str, end: str) -> dict[str, dict[str, int]]:
    """Records between two LSNs by type: count, record bytes, FPI bytes, all bytes."""
    found = {}
    for line in pg.wal_record_stats(start, end).splitlines():
        if match := _STAT_LINE.match(line.strip()):
            found[match["type"]] = {
                key: int(match[key]) for key in ("n", "record", "fpi", "combined")
            }
    return found


async def _flush_lsn(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        lsn: str = await conn.fetchval("SELECT pg_current_wal_flush_lsn()::text")
    finally:
        await conn.close()
    return lsn


async def _done(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'DONE'")
    finally:
        await conn.close()
    return count


async def _create(base_url: str, tasks: int, concurrency: int) -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(tasks):
        queue.put_nowait(n)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            n = queue.get_nowait()
            reply = await client.post("/api/v1/tasks", json={"type": "echo", "payload": {"n": n}})
            if reply.status_code != 201:
                raise RuntimeError(f"create answered {reply.status_code}: {reply.text}")

    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))


def per_task(stats: dict[str, dict[str, int]], tasks: int) -> dict[str, float]:
    """The figures of one run, per task."""

    def n(*kinds: str) -> int:
        # "+INIT": the same record on a page it starts afresh
        return sum(stats.get(k, {}).get("n", 0) for kind in kinds for k in (kind, kind + "+INIT"))

    total = sum(s["combined"] for s in stats.values())
    fpi = sum(s["fpi"] for s in stats.values())
    return {
        "wal_bytes": total / tasks,
        "wal_fpi_bytes": fpi / tasks,
        "wal_records": sum(s["n"] for s in stats.values()) / tasks,
        "commits": n("Transaction/COMMIT") / tasks,
        "heap_inserts": n("Heap/INSERT", "Heap2/MULTI_INSERT") / tasks,
        "heap_updates_hot": n("Heap/HOT_UPDATE") / tasks,
        "heap_updates_other": n("Heap/UPDATE") / tasks,
        "heap_deletes": n("Heap/DELETE") / tasks,
        "row_locks": n("Heap/LOCK") / tasks,  # FOR UPDATE of the relay's and the rescue's claims
        "index_entries": n("Btree/INSERT_LEAF", "Btree/INSERT_POST") / tasks,
        "index_wal_bytes": sum(s["combined"] for k, s in stats.items() if k.startswith("Btree/"))
        / tasks,
        "index_page_splits": n("Btree/SPLIT_L", "Btree/SPLIT_R") / tasks,
    }


async def measure(tasks: int, concurrency: int) -> dict[str, Any]:
    pg = OwnPostgres("bench")
    prefix = f"bench.pgcost.{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.pop("TASKBOX_FAILPOINTS", None)
    env |= {
        "DATABASE_URL": pg.url,
        "AMQP_URL": AMQP_URL,
        "EXCHANGE_NAME": f"{prefix}.x",
        "QUEUE_NAME": f"{prefix}.q",
        "DEAD_LETTER_EXCHANGE": f"{prefix}.dlx",
        "DEAD_LETTER_QUEUE": f"{prefix}.dead",
        "RETENTION_INTERVAL": "0",
        "RELAY_METRICS_PORT": "0",
        "CONSUMER_METRICS_PORT": "0",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    procs: list[Process] = []
    try:
        await asyncio.to_thread(pg.create)
        migrated = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "taskbox.db", "migrate"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if migrated.returncode:
            raise RuntimeError(migrated.stderr)
        port = free_port()
        procs.append(await taskbox("api", env, API_PORT=str(port), API_ACCESS_LOG="false").start())
        procs.append(await taskbox("relay", env).start())
        procs.append(await taskbox("consumer", env).start())
        base_url = f"http://127.0.0.1:{port}"

        created = 0

        async def run(checkpoint: bool) -> dict[str, Any]:
            nonlocal created
            if checkpoint:
                conn = await asyncpg.connect(pg.url)
                try:
                    await conn.execute("CHECKPOINT")
                finally:
                    await conn.close()
            start = await _flush_lsn(pg.url)
            began = time.monotonic()
            await _create(base_url, tasks, concurrency)
            created += tasks
            await wait_until(lambda: _is_done(pg.url, created), within=tasks / 50 + 60)
            seconds = time.monotonic() - began
            end = await _flush_lsn(pg.url)
            stats = await asyncio.to_thread(wal_stats, pg, start, end)
            return {"seconds": round(seconds, 2), **per_task(stats, tasks), "records": stats}

        # warm-up: the processes' first connections, caches and the tables' first pages
        await _create(base_url, 200, concurrency)
        created = 200
        await wait_until(lambda: _is_done(pg.url, created), within=60)
        return {
            "tasks": tasks,
            "concurrency": concurrency,
            "after_checkpoint": await run(checkpoint=True),
            "steady": await run(checkpoint=False),
        }
    finally:
        for proc in procs:
            await proc.stop()
        await asyncio.to_thread(pg.destroy)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for queue in (f"{prefix}.q", f"{prefix}.dead", f"{prefix}.dead.watch"):
                await channel.queue_delete(queue)
            for exchange in (f"{prefix}.x", f"{prefix}.dlx"):
                await channel.exchange_delete(exchange)


async def _is_done(url: str, expected: int) -> bool:
    return await _done(url) >= expected


def table(result: dict[str, Any]) -> str:
    rows = [
        ("WAL bytes", "wal_bytes", "{:,.0f}"),
        ("  of it full-page images", "wal_fpi_bytes", "{:,.0f}"),
        ("WAL records", "wal_records", "{:.1f}"),
        ("commits (that wrote WAL)", "commits", "{:.2f}"),
        ("heap inserts", "heap_inserts", "{:.2f}"),
        ("heap updates, HOT", "heap_updates_hot", "{:.2f}"),
        ("heap updates, not HOT", "heap_updates_other", "{:.2f}"),
        ("row locks (FOR UPDATE)", "row_locks", "{:.2f}"),
        ("index entries (B-tree leaf inserts)", "index_entries", "{:.2f}"),
        ("  WAL bytes of all index records", "index_wal_bytes", "{:,.0f}"),
        ("index page splits", "index_page_splits", "{:.3f}"),
    ]
    lines = [
        f"Postgres per task: {result['tasks']} tasks created -> DONE, "
        f"{result['concurrency']} creates in flight",
        f"{'per task':<38} {'after a checkpoint':>19} {'steady':>10}",
    ]
    for label, key, fmt in rows:
        first = fmt.format(result["after_checkpoint"][key])
        second = fmt.format(result["steady"][key])
        lines.append(f"{label:<38} {first:>19} {second:>10}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print JSON, not the table")
    args = parser.parse_args()
    result = asyncio.run(measure(args.tasks, args.concurrency))
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
