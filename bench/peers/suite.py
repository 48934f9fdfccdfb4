"""The peer workloads of issue 14, run in Taskbox's venv: Taskbox, pgqueuer, Celery and
procrastinate side by side in one run, next to the bare ceilings.

1. ingest: wrk -c32 against one uvicorn worker each (Taskbox's api, each peer's
   enqueue endpoint, the bare FastAPI + asyncpg INSERT), in alternating rounds.
2. drain: a pre-filled store of no-op jobs, one worker (Taskbox: one relay and one
   consumer, from the outbox); jobs/s and CPU a job in the workers and both servers.
3. latency: an open loop at a fixed rate; enqueue -> handler start from just before the
   enqueue call, and enqueue -> done beside it.

Each peer gets its own database (created here, dropped afterwards) and queue names; its
processes run from .venv-peers (``PEER_PYTHON``), see bench/peers/__init__.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson

from bench.harness import ADMIN_DSN, AMQP_URL, ROOT, Process, Stage, percentile, stage, taskbox
from bench.peers import cpu
from bench.peers.kit import READY, RESULT
from bench.peers.rawhttp import KeepAliveClient
from bench.scenarios import SEED_TASKS, _free_port, _wrk
from taskbox.api.notifier import OutboxNotifier
from taskbox.db.pool import create_pool
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, create_task

PEERS = ("pgqueuer", "celery", "procrastinate")
PEER_PYTHON = Path(os.environ.get("BENCH_PEERS_PYTHON", ROOT / ".venv-peers" / "bin" / "python"))
# Taskbox's processes load the timed handler (bench/tasks.py) beside the built-ins.
TIMED = {"TASK_MODULES": "bench.tasks"}
# The ingest ceiling, served as bench/scenarios.py serves it for the ingest benchmark.
BARE_APP = [sys.executable, "-m", "uvicorn", "bench.baseline_app:app", "--workers", "1"]
BARE_APP += ["--no-access-log"]

Result = dict[str, Any]


def check_peer_venv() -> None:
    """Fail loudly, never skip: a suite without its peers would compare nothing."""
    if not PEER_PYTHON.exists():
        raise RuntimeError(
            f"{PEER_PYTHON} is missing: the peers run from their own venv, built by "
            "`make peers-venv` from bench/peers/requirements.txt (needs PyPI)"
        )


# -- one peer's scratch database and queue -------------------------------------------------


@dataclass
class PeerStage:
    peer: str
    database_url: str
    queue: str

    def args(self, command: str, **options: object) -> list[str]:
        argv = [
            str(PEER_PYTHON),
            "-m",
            f"bench.peers.{self.peer}_peer",
            command,
            "--database-url",
            self.database_url,
            "--amqp-url",
            AMQP_URL,
            "--queue",
            self.queue,
        ]
        for name, value in options.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        return argv

    async def run(self, command: str, **options: object) -> Result:
        """A one-shot command (setup, fill, produce); its result line."""
        done = await asyncio.to_thread(
            subprocess.run, self.args(command, **options), cwd=ROOT, capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"{self.peer} {command} failed:\n{done.stdout}\n{done.stderr}")
        return _result(done.stdout.splitlines(), f"{self.peer} {command}")

    def process(self, command: str, **options: object) -> Process:
        """A long-running command (serve, drain, work), not started yet."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return Process(self.args(command, **options), env, ready=READY)

    async def start(self, command: str, **options: object) -> Process:
        return await self.process(command, **options).start()


def _result(lines: list[str], what: str) -> Result:
    for line in reversed(lines):
        if line.startswith(RESULT):
            result: Result = json.loads(line[len(RESULT) :])
            return result
    raise RuntimeError(f"{what} printed no result:\n" + "\n".join(lines[-40:]))


async def _wait_result(proc: Process, what: str, within: float) -> Result:
    deadline = time.monotonic() + within
    while True:
        lines = proc.output()
        if any(line.startswith(RESULT) for line in lines):
            return _result(lines, what)
        assert proc.proc is not None
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not finish:\n" + "\n".join(lines[-40:]))
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def peer_stage(peer: str) -> AsyncIterator[PeerStage]:
    suffix = uuid.uuid4().hex[:6]
    database = f"taskbox_bench_peer_{peer}_{suffix}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{database}"')
    finally:
        await admin.close()
    st = PeerStage(peer, ADMIN_DSN.rsplit("/", 1)[0] + "/" + database, f"bench_{peer}_{suffix}")
    try:
        await st.run("setup")
        yield st
    finally:
        if peer == "celery":  # Celery's queue and exchange are named after the queue
            connection = await aio_pika.connect(AMQP_URL)
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(st.queue)
                await channel.exchange_delete(st.queue)
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        finally:
            await admin.close()


# -- 1. ingest -------------------------------------------------------------------------------


async def ingest(seconds: int, rounds: int, warmup: int) -> Result:
    """req/s of one enqueue a request, each system behind one uvicorn worker."""
    async with contextlib.AsyncExitStack() as stack:
        # Unwound last in, first out: each process stops before its database is dropped.
        st = await stack.enter_async_context(stage("peers_ingest"))
        urls: dict[str, str] = {}

        async def serve(name: str, process: Process, url: str) -> None:
            stack.push_async_callback(process.stop)
            await process.start()
            urls[name] = url

        port = _free_port()
        bare = Process([*BARE_APP, "--port", str(port)], st.env, "Application startup complete")
        await serve("bare", bare, f"http://127.0.0.1:{port}/baseline")
        port = _free_port()
        api = taskbox("api", st.env, API_PORT=str(port), API_ACCESS_LOG="false")
        await serve("taskbox", api, f"http://127.0.0.1:{port}/api/v1/tasks")
        for peer in PEERS:
            pst = await stack.enter_async_context(peer_stage(peer))
            port = _free_port()
            await serve(peer, pst.process("serve", port=port), f"http://127.0.0.1:{port}/enqueue")
        for url in urls.values():  # connections, caches, page-ins
            await _wrk(url, warmup)
        runs: dict[str, list[float]] = {name: [] for name in urls}
        for _ in range(rounds):  # alternate, so drift on a shared box hits all alike
            for name, url in urls.items():
                runs[name].append(await _wrk(url, seconds))
    best = {name: max(values) for name, values in runs.items()}
    return {"req_s": best, "runs": runs, "seconds": seconds}


async def _stop_all(procs: list[Process]) -> None:
    for proc in reversed(procs):
        await proc.stop()


# -- 2. drain --------------------------------------------------------------------------------


def _cpu_per_job(jobs: int, workers: dict[str, float], servers: cpu.Snapshot) -> Result:
    ms = {"workers": 1000 * sum(workers.values()) / jobs}
    ms.update({name: 1000 * sec / jobs for name, sec in servers.servers.items()})
    ms["total"] = sum(ms.values())
    return {
        "cpu_ms_per_job": ms,
        "worker_cpu_ms_per_job": {name: 1000 * sec / jobs for name, sec in workers.items()},
        # the whole box over the servers' window, ours or not (2.0 = both cores): what
        # is far above our own share was someone else's load
        "box_busy_cores": servers.busy_cores,
    }


async def drain_taskbox(jobs: int) -> Result:
    """One relay and one consumer through a backlog already in the outbox."""
    async with stage("peers_drain") as st:
        relay = await taskbox("relay", st.env).start()
        consumer = await taskbox("consumer", st.env).start()
        try:
            await asyncio.sleep(1.0)  # both connected, declared and idle
            conn = await asyncpg.connect(st.database_url)
            try:
                # The whole backlog in one commit; the relay only learns of it from the
                # NOTIFY below (or its next poll), as from a store filled before it ran.
                await conn.execute(SEED_TASKS, jobs, "NEW")
                relay_before, consumer_before = relay.cpu_seconds(), consumer.cpu_seconds()
                servers_before = cpu.snapshot()
                await conn.execute("SELECT pg_notify($1, '')", st.channel)
                deadline = time.monotonic() + jobs / 50 + 60
                while (
                    await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'DONE'") < jobs
                ):
                    if time.monotonic() > deadline:
                        raise TimeoutError("Taskbox did not drain its backlog in time")
                    await asyncio.sleep(0.05)
                servers = cpu.snapshot() - servers_before
                workers = {
                    "relay": relay.cpu_seconds() - relay_before,
                    "consumer": consumer.cpu_seconds() - consumer_before,
                }
                # From the relay's first claim to the last result, by the database's clock:
                # process start-up stays out, as it does for the peers.
                span = float(
                    await conn.fetchval(
                        "SELECT extract(epoch FROM (SELECT max(finished_at) FROM tasks)"
                        " - (SELECT min(published_at) FROM outbox))"
                    )
                )
            finally:
                await conn.close()
        finally:
            await consumer.stop()
            await relay.stop()
    return {"jobs": jobs, "jobs_s": jobs / span, **_cpu_per_job(jobs, workers, servers)}


async def drain_peer(peer: str, jobs: int, **options: object) -> Result:
    """The peer's own store filled with ``jobs`` no-op jobs, then one worker started."""
    async with peer_stage(peer) as st:
        await st.run("fill", count=jobs)
        servers_before = cpu.snapshot()
        worker = await st.start("drain", count=jobs, **options)
        try:
            result = await _wait_result(worker, f"{peer} drain", within=jobs / 20 + 60)
            servers = cpu.snapshot() - servers_before
        finally:
            await worker.stop()
    # The worker's CPU is its own reading from its first handler start to the end (see
    # kit.Recorder); the servers' window also holds the worker's connecting.
    span = result["seconds"]
    return {
        "jobs": jobs,
        "jobs_s": jobs / span,
        **_cpu_per_job(jobs, {"worker": result["cpu_seconds"]}, servers),
    }


# -- 3. latency ------------------------------------------------------------------------------


def _latency(samples: list[tuple[float, float, float]], warmup_jobs: int) -> Result:
    """(t0, to start ms, to done ms) per job; the first ``warmup_jobs`` (by t0) are dropped:
    every system's first jobs pay for connections and code paths not yet warm."""
    kept = sorted(samples)[warmup_jobs:]
    start = [s for _, s, _ in kept]
    done = [d for _, _, d in kept]
    return {
        "jobs": len(kept),
        "start_p50_ms": percentile(start, 50),
        "start_p99_ms": percentile(start, 99),
        "done_p50_ms": percentile(done, 50),
        "done_p99_ms": percentile(done, 99),
    }


async def _open_loop(rate: float, seconds: float, create: Any) -> list[str]:
    """``await create(t0)`` at a fixed rate, each call its own task, ``t0`` read just
    before it; the task ids created."""
    total = int(rate * seconds)
    start = time.perf_counter()
    calls = []
    for i in range(total):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        calls.append(asyncio.create_task(create(time.time())))
    return list(await asyncio.gather(*calls))


# Where a Taskbox task's time goes, each stage from one timestamp to the next: t0 (the
# client, just before create), created_at (the insert's transaction start), the relay's
# claim (published_at), the consumer's claim (started_at), the handler's own start.
STAGES = ("t0", "created", "relay_claim", "consumer_claim", "handler_start")


async def _taskbox_run(st: Stage, ids: list[str], warmup_jobs: int) -> Result:
    """Wait for the tasks ``ids``; their latency figures and the stages' p50 / p99."""
    conn = await asyncpg.connect(st.database_url)
    try:
        deadline = time.monotonic() + 60
        while await conn.fetchval(
            "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[]) AND status = 'DONE'", ids
        ) < len(ids):
            if time.monotonic() > deadline:
                raise TimeoutError("Taskbox did not finish the latency run's tasks in time")
            await asyncio.sleep(0.1)
        rows = await conn.fetch(
            "SELECT (t.payload->>'t0')::float8 AS t0,"
            " extract(epoch FROM t.created_at)::float8 AS created,"
            " extract(epoch FROM o.published_at)::float8 AS relay_claim,"
            " extract(epoch FROM t.started_at)::float8 AS consumer_claim,"
            " (t.result->>'started')::float8 AS handler_start,"
            " extract(epoch FROM t.finished_at)::float8 AS finished"
            " FROM tasks t JOIN outbox o ON o.task_id = t.id AND o.kind = 'task.created'"
            " WHERE t.id = ANY($1::uuid[]) ORDER BY 1",
            ids,
        )
    finally:
        await conn.close()
    kept = rows[warmup_jobs:]
    stages = {
        f"{a}->{b}": [(r[b] - r[a]) * 1000 for r in kept] for a, b in itertools.pairwise(STAGES)
    }
    # done: the result transaction's start (finished_at), as DONE's timestamp says
    samples = [
        (r["t0"], (r["handler_start"] - r["t0"]) * 1000, (r["finished"] - r["t0"]) * 1000)
        for r in rows
    ]
    return {
        **_latency(samples, warmup_jobs),
        "stages_p50_ms": {k: percentile(v, 50) for k, v in stages.items()},
        "stages_p99_ms": {k: percentile(v, 99) for k, v in stages.items()},
    }


@contextlib.asynccontextmanager
async def in_process_creates(st: Stage) -> AsyncIterator[Callable[[float], Awaitable[str]]]:
    """``create(t0)``: one ``bench.timed`` task created as the api creates it (its
    statement, then the relay's wake-up after the commit), from this process."""
    settings = DatabaseSettings(database_url=st.database_url, outbox_channel=st.channel)
    pool = await create_pool(settings)
    notifier = OutboxNotifier(pool, st.channel)

    async def create(t0: float) -> str:
        row = await create_task(pool, NewTask("bench.timed", {"t0": t0}, 0, 3))
        notifier.wake()  # after the commit, as the api does
        return str(row["id"])

    try:
        yield create
    finally:
        await notifier.close()
        await pool.close()


async def latency_taskbox(rate: float, seconds: float, warmup: float) -> Result:
    """In-process create (the api's statement and wake-up, called from this process) and
    POST /api/v1/tasks, each at ``rate``, one after the other, against one pipeline."""
    total = seconds + warmup
    async with stage("peers_latency") as st:
        port = _free_port()
        procs = [
            await taskbox(
                "api", st.env, API_PORT=str(port), API_ACCESS_LOG="false", **TIMED
            ).start(),
            await taskbox("relay", st.env).start(),
            await taskbox("consumer", st.env, **TIMED).start(),
        ]
        try:
            await asyncio.sleep(1.0)
            async with in_process_creates(st) as create_in_process:
                in_process = await _open_loop(rate, total, create_in_process)
            answered: dict[str, float] = {}  # task id -> t0 -> 201, ms: the api's share
            async with KeepAliveClient("127.0.0.1", port) as client:

                async def create_over_http(t0: float) -> str:
                    body = orjson.dumps({"type": "bench.timed", "payload": {"t0": t0}})
                    status, answer = await client.post_json("/api/v1/tasks", body)
                    if status != 201:
                        raise RuntimeError(f"POST /api/v1/tasks answered {status}: {answer!r}")
                    task_id = str(orjson.loads(answer)["id"])
                    answered[task_id] = (time.time() - t0) * 1000
                    return task_id

                over_http = await _open_loop(rate, total, create_over_http)
            warm = int(rate * warmup)
            return {
                "in_process": await _taskbox_run(st, in_process, warm),
                "http": {
                    **await _taskbox_run(st, over_http, warm),
                    "201_p50_ms": percentile([answered[i] for i in over_http[warm:]], 50),
                    "201_p99_ms": percentile([answered[i] for i in over_http[warm:]], 99),
                },
            }
        finally:
            await _stop_all(procs)


async def latency_peer(peer: str, rate: float, seconds: float, warmup: float) -> Result:
    """The peer's worker up first, then its producer process at ``rate``."""
    jobs = int(rate * (seconds + warmup))
    async with peer_stage(peer) as st:
        worker = await st.start("work", count=jobs)
        try:
            await st.run("produce", rate=rate, seconds=seconds + warmup)
            result = await _wait_result(worker, f"{peer} work", within=60)
        finally:
            await worker.stop()
    samples = [(t0, start, done) for t0, start, done in result["samples"]]
    return _latency(samples, int(rate * warmup))


# -- the suite ---------------------------------------------------------------------------------


async def peers(
    ingest_seconds: int,
    ingest_rounds: int,
    drain_jobs: int,
    rate: float,
    latency_seconds: float,
    warmup: float,
) -> Result:
    check_peer_venv()
    drain: Result = {"taskbox": await drain_taskbox(drain_jobs)}
    for peer in PEERS:
        drain[peer] = await drain_peer(peer, drain_jobs)
    # pgqueuer dequeues 10 jobs a query by default; at 100 it drains several times
    # faster, so the drain target is checked against the faster of the two.
    drain["pgqueuer_batch100"] = await drain_peer("pgqueuer", drain_jobs, batch=100)
    latency: Result = {"taskbox": await latency_taskbox(rate, latency_seconds, warmup)}
    for peer in PEERS:
        latency[peer] = await latency_peer(peer, rate, latency_seconds, warmup)
    return {
        "ingest": await ingest(ingest_seconds, ingest_rounds, warmup=max(1, round(warmup))),
        "drain": drain,
        "latency": latency,
        "rate": rate,
        "versions": await peer_versions(),
    }


async def peer_versions() -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
        "('pgqueuer', 'celery', 'kombu', 'procrastinate', 'psycopg', 'asyncpg')}))"
    )
    done = await asyncio.to_thread(
        subprocess.run, [str(PEER_PYTHON), "-c", code], capture_output=True, text=True, check=True
    )
    versions: dict[str, str] = json.loads(done.stdout)
    return versions
