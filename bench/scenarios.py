"""The benchmarks. Each returns its figures and the baseline measured beside them."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.harness import ROOT, Process, Stage, percentile, stage, taskbox, wait_until
from bench.queue_tasks import SLOW_QUEUE, SLOW_TYPE
from taskbox.api.notifier import OutboxNotifier
from taskbox.api.schemas import MAX_BATCH
from taskbox.db.pool import create_pool
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, create_task

Result = dict[str, Any]

# Seeding large backlogs straight in SQL: the same rows the API would write.
SEED_TASKS = """
WITH task AS (
    INSERT INTO tasks (type, payload, status)
    SELECT 'echo', jsonb_build_object('i', g), $2 FROM generate_series(1, $1) AS g
    RETURNING id, type, priority
)
INSERT INTO outbox (task_id, kind, body)
SELECT id, 'task.created', jsonb_build_object('task_id', id, 'type', type, 'priority', priority)
FROM task
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _rawamqp(*args: str) -> Result:
    out = subprocess.run(
        [sys.executable, "-m", "bench.rawamqp", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: Result = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def _wrk(
    url: str, seconds: float, connections: int = 32, script: str = "post.lua", batch: int = 0
) -> float:
    """Requests per second wrk measured; ``batch`` sets BATCH_SIZE for batch.lua."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    out = await asyncio.to_thread(
        subprocess.run,
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(ROOT / "bench" / script),
            url,
        ],
        env={**os.environ, "BATCH_SIZE": str(batch)} if batch else None,
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    if match is None or non2xx is not None:
        raise RuntimeError(f"wrk run failed:\n{out.stdout}\n{out.stderr}")
    return float(match.group(1))


async def _value(database_url: str, sql: str, *args: Any) -> Any:
    """One value from the database, on a connection of its own."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def _count(database_url: str, sql: str, *args: Any) -> int:
    count: int = await _value(database_url, sql, *args)
    return count


# -- 1. ingest ------------------------------------------------------------------------


async def ingest(seconds: float, rounds: int = 2, batch: int = 1000) -> Result:
    """POST /api/v1/tasks against a bare FastAPI + asyncpg single-INSERT endpoint, and
    POST /api/v1/tasks/batch (``batch`` tasks a request) against the single POST."""
    async with stage("ingest") as st:
        base_port, api_port = _free_port(), _free_port()
        baseline = await Process(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bench.baseline_app:app",
                "--port",
                str(base_port),
                "--workers",
                "1",
                "--no-access-log",
            ],
            st.env,
            ready="Application startup complete",
        ).start()
        api = await taskbox("api", st.env, API_PORT=str(api_port), API_ACCESS_LOG="false").start()
        try:
            base_url = f"http://127.0.0.1:{base_port}/baseline"
            api_url = f"http://127.0.0.1:{api_port}/api/v1/tasks"
            await _wrk(base_url, 2)  # warm both up: connections, caches, JIT-free but page-ins
            await _wrk(api_url, 2)
            base_runs, api_runs = [], []
            for _ in range(rounds):  # alternate, so drift on a shared box hits both alike
                base_runs.append(await _wrk(base_url, seconds))
                api_runs.append(await _wrk(api_url, seconds))
            api_cpu = api.cpu_seconds()
            created = await _count(st.database_url, "SELECT count(*) FROM tasks")
            # Batches: few connections (each request carries `batch` tasks), tasks/s.
            batch_url = f"{api_url}/batch"
            await _wrk(batch_url, 2, connections=4, script="batch.lua", batch=batch)
            batch_runs = [
                batch
                * await _wrk(batch_url, seconds, connections=4, script="batch.lua", batch=batch)
                for _ in range(rounds)
            ]
        finally:
            await api.stop()
            await baseline.stop()
    base, ours = max(base_runs), max(api_runs)
    return {
        "baseline_req_s": base,
        "taskbox_req_s": ours,
        "ratio": ours / base,
        "target_ratio": 0.9,
        "runs": {"baseline": base_runs, "taskbox": api_runs, "batch_tasks_s": batch_runs},
        "api_cpu_ms_per_task": 1000 * api_cpu / created,
        "batch_size": batch,
        "batch_tasks_s": max(batch_runs),
        "batch_ratio": max(batch_runs) / ours,
        "target_batch_ratio": 20,
    }


# -- 1b. the cost of tracing -------------------------------------------------------------


class _OtlpSink(http.server.BaseHTTPRequestHandler):
    """Takes OTLP/HTTP exports and drops them: a collector that costs the api nothing."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _tree_at(ref: str, into: Path) -> Path:
    """The source tree of git ``ref``, for running the code from before a change."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


async def tracing_cost(
    seconds: float, relay_rows: int, rounds: int = 3, before: str = ""
) -> Result:
    """POST /api/v1/tasks with tracing off (the default); on, every request sampled and
    exported over OTLP/HTTP to a local sink; on with one request in ten sampled; and,
    given ``before`` (a git ref: BENCH_TRACING_BEFORE), the api of that commit: the code
    with no OpenTelemetry at all. Then a relay draining ``relay_rows`` rows, each with a
    stored trace, with tracing off and on (one span a row). Rounds alternate between the
    variants, so drift on a shared box hits each alike."""
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtlpSink)
    sink_thread = threading.Thread(target=sink.serve_forever, daemon=True)
    sink_thread.start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}"
    variants: dict[str, tuple[Path, dict[str, str]]] = {
        "off": (ROOT, {}),
        "on": (ROOT, {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}),
        # One request in ten sampled, as a busy deployment would trace
        "sampled": (
            ROOT,
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.1",
            },
        ),
    }
    with tempfile.TemporaryDirectory(prefix="taskbox-before-") as scratch:
        if before:
            variants["before"] = (_tree_at(before, Path(scratch)), {})
        async with stage("tracing") as st:
            apis: dict[str, Process] = {}
            urls: dict[str, str] = {}
            try:
                for name, (cwd, extra) in variants.items():
                    port = _free_port()
                    api = taskbox("api", st.env, API_PORT=str(port), API_ACCESS_LOG="false")
                    api.env.update(extra)
                    api.cwd = cwd
                    apis[name] = await api.start()
                    urls[name] = f"http://127.0.0.1:{port}/api/v1/tasks"
                for url in urls.values():
                    await _wrk(url, 2)  # warm-up
                runs: dict[str, list[float]] = {name: [] for name in variants}
                cpu = dict.fromkeys(variants, 0.0)
                for _ in range(rounds):
                    for name, url in urls.items():
                        before_cpu = apis[name].cpu_seconds()
                        runs[name].append(await _wrk(url, seconds))
                        cpu[name] += apis[name].cpu_seconds() - before_cpu
            finally:
                for api in apis.values():
                    await api.stop()
        relay = await _relay_tracing_cost(relay_rows, rounds, endpoint)
    sink.shutdown()
    sink.server_close()
    best = {name: max(found) for name, found in runs.items()}
    # CPU a request, from the requests wrk reported (rate x duration, over the rounds).
    cpu_ms = {name: 1000 * cpu[name] / (sum(runs[name]) * seconds) for name in runs}
    result: Result = {
        "req_s": best,
        "runs": runs,
        "api_cpu_ms_per_request": cpu_ms,
        "on_ratio": best["on"] / best["off"],
        "sampled_ratio": best["sampled"] / best["off"],
        "before": before or None,
        "relay": relay,
    }
    if "before" in best:
        result["off_ratio_to_before"] = best["off"] / best["before"]
    return result


# Rows as the api writes them, each with a trace context of its own.
SEED_TRACED_TASKS = """
WITH task AS (
    INSERT INTO tasks (type, payload, status)
    SELECT 'echo', jsonb_build_object('i', g), 'NEW' FROM generate_series(1, $1) AS g
    RETURNING id, type, priority
)
INSERT INTO outbox (task_id, kind, body, headers)
SELECT id, 'task.created', jsonb_build_object('task_id', id, 'type', type, 'priority', priority),
       jsonb_build_object('traceparent', '00-' || md5(random()::text) || '-'
                          || substr(md5(random()::text), 1, 16) || '-01')
FROM task
"""


async def _relay_tracing_cost(rows: int, rounds: int, endpoint: str) -> Result:
    """rows/s and CPU a row of one relay draining ``rows`` traced rows, off and on."""
    variants = {"off": {}, "on": {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu = dict.fromkeys(variants, 0.0)
    async with stage("tracing_relay") as st:
        for _ in range(rounds):
            for name, extra in variants.items():
                relay = await taskbox("relay", st.env, **extra).start()
                try:
                    await asyncio.sleep(1.0)  # let it connect and declare
                    before_cpu = relay.cpu_seconds()
                    conn = await asyncpg.connect(st.database_url)
                    try:
                        await conn.execute(SEED_TRACED_TASKS, rows)
                        start = time.monotonic()
                        await conn.execute("SELECT pg_notify($1, '')", st.channel)
                    finally:
                        await conn.close()
                    end = await wait_until(
                        lambda: _none_unpublished(st.database_url),
                        within=rows / 200 + 60,
                        interval=0.05,
                    )
                    cpu[name] += relay.cpu_seconds() - before_cpu
                    rates[name].append(rows / (end - start))
                finally:
                    await relay.stop()
            await _value(st.database_url, "TRUNCATE tasks, outbox CASCADE")
    return {
        "rows": rows,
        "rows_s": {name: max(found) for name, found in rates.items()},
        "runs": rates,
        "cpu_ms_per_row": {name: 1000 * cpu[name] / (rows * rounds) for name in variants},
        "on_ratio": max(rates["on"]) / max(rates["off"]),
    }


# -- 2. NOTIFY placement ----------------------------------------------------------------


async def notify_placement(seconds: float, writers: int = 16) -> Result:
    """Task-creation commits/s: no wake-up, NOTIFY in the transaction, NOTIFY after commit."""
    async with stage("notify") as st:
        settings = DatabaseSettings(database_url=st.database_url, outbox_channel=st.channel)
        pool = await create_pool(settings, min_size=writers + 1, max_size=writers + 1)
        listener = await asyncpg.connect(st.database_url)
        await listener.add_listener(st.channel, lambda *_: None)  # a real listener pays delivery
        task = NewTask("echo", {"x": 1}, 0, 3)
        notifier = OutboxNotifier(pool, st.channel)

        async def none(conn: asyncpg.Connection) -> None:
            await create_task(conn, task)

        async def in_transaction(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await create_task(conn, task)
                await conn.execute("SELECT pg_notify($1, '')", st.channel)

        async def after_commit(conn: asyncpg.Connection) -> None:
            await create_task(conn, task)
            notifier.wake()

        async def run(write: Any) -> float:
            count = 0
            deadline = time.monotonic() + seconds

            async def writer() -> None:
                nonlocal count
                async with pool.acquire() as conn:
                    while time.monotonic() < deadline:
                        await write(conn)
                        count += 1

            await asyncio.gather(*(writer() for _ in range(writers)))
            return count / seconds

        try:
            results = {}
            for name, write in (
                ("no_notify", none),
                ("notify_in_transaction", in_transaction),
                ("notify_after_commit_coalesced", after_commit),
                ("no_notify_again", none),
            ):
                results[name] = await run(write)
            await notifier.close()
        finally:
            await listener.close()
            await pool.close()
    baseline = (results["no_notify"] + results["no_notify_again"]) / 2
    return {
        "writers": writers,
        "commits_s": results,
        "in_transaction_ratio": results["notify_in_transaction"] / baseline,
        "after_commit_ratio": results["notify_after_commit_coalesced"] / baseline,
        "target_ratio": 0.9,
    }


# -- 3. relay ---------------------------------------------------------------------------


async def relay_drain(rows: int) -> Result:
    """One relay draining a backlog vs bare aio-pika publishing with confirms."""
    async with stage("relay") as st:
        raw = await asyncio.to_thread(
            _rawamqp, "publish", "--count", str(rows), "--queue", st.broker.queue_name + ".raw"
        )
        # The same publishing into a queue declared like Taskbox's (x-max-priority).
        raw_priority = await asyncio.to_thread(
            _rawamqp,
            "publish",
            "--count",
            str(rows),
            "--queue",
            st.broker.queue_name + ".raw-priority",
            "--max-priority",
            str(st.broker.max_priority),
        )
        relay = await taskbox("relay", st.env).start()
        try:
            await asyncio.sleep(1.0)  # let it connect and declare
            conn = await asyncpg.connect(st.database_url)
            try:
                await conn.execute(SEED_TASKS, rows, "NEW")
                start = time.monotonic()
                await conn.execute("SELECT pg_notify($1, '')", st.channel)
            finally:
                await conn.close()
            end = await wait_until(
                lambda: _none_unpublished(st.database_url), within=rows / 200 + 60, interval=0.05
            )
            cpu = relay.cpu_seconds()
        finally:
            await relay.stop()
    rate = rows / (end - start)
    return {
        "rows": rows,
        "baseline_msg_s": raw["per_second"],
        "relay_rows_s": rate,
        "ratio": rate / raw["per_second"],
        "target_ratio": 0.8,
        "baseline_priority_queue_msg_s": raw_priority["per_second"],
        "ratio_same_queue": rate / raw_priority["per_second"],
        "relay_cpu_ms_per_row": 1000 * cpu / rows,
    }


async def _none_unpublished(database_url: str) -> bool:
    return await _count(database_url, "SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0


# -- 4. consumer --------------------------------------------------------------------------


async def _publish_backlog(st: Stage, tasks: int) -> None:
    """Seed ``tasks`` echo tasks and let a relay put all their messages on the queue."""
    conn = await asyncpg.connect(st.database_url)
    try:
        await conn.execute(SEED_TASKS, tasks, "NEW")
    finally:
        await conn.close()
    relay = await taskbox("relay", st.env).start()
    try:
        await wait_until(lambda: _none_unpublished(st.database_url), within=tasks / 200 + 60)
    finally:
        await relay.stop()


async def consumer_drain(tasks: int) -> Result:
    """One consumer draining queued no-op tasks vs bare aio-pika consume + ack."""
    async with stage("consumer") as st:
        raw_queue = st.broker.queue_name + ".raw"
        await asyncio.to_thread(_rawamqp, "publish", "--count", str(tasks), "--queue", raw_queue)
        raw = await asyncio.to_thread(
            _rawamqp, "consume", "--count", str(tasks), "--queue", raw_queue
        )
        await _publish_backlog(st, tasks)
        consumer = await taskbox("consumer", st.env).start()
        try:
            await wait_until(
                lambda: _all_done(st.database_url, tasks), within=tasks / 100 + 60, interval=0.1
            )
            cpu = consumer.cpu_seconds()
        finally:
            await consumer.stop()
        # From the first claim to the last commit, by the database's clock: excludes
        # process start-up, like the baseline's first-message-to-last-ack window.
        span = await _value(
            st.database_url,
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM tasks",
        )
        once = await _count(st.database_url, "SELECT count(*) FROM tasks WHERE attempts = 1")
    rate = tasks / float(span)
    return {
        "tasks": tasks,
        "baseline_msg_s": raw["per_second"],
        "consumer_tasks_s": rate,
        "ratio": rate / raw["per_second"],
        "target_tasks_s": 3000,
        "ran_once": once == tasks,
        "consumer_cpu_ms_per_task": 1000 * cpu / tasks,
    }


async def _all_done(database_url: str, expected: int) -> bool:
    return (
        await _count(database_url, "SELECT count(*) FROM tasks WHERE status = 'DONE'") >= expected
    )


# -- 5. end to end ------------------------------------------------------------------------


async def _open_loop(url: str, rate: float, seconds: float) -> list[tuple[str, float]]:
    """POST at a fixed arrival rate whatever the responses do; (task id, time of 201)."""
    total = int(rate * seconds)
    answered: list[tuple[str, float]] = []
    # Idle connections expire here before the api's keep-alive timeout (5 s) closes
    # them: at the same 5 s, a POST could go out on a connection the api is closing
    # and fail with a ReadError, which happened on a loaded box.
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=2.0)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def post() -> None:
            response = await client.post(url, json={"type": "echo", "payload": {"x": 1}})
            received = time.time()
            if response.status_code == 201:
                answered.append((response.json()["id"], received))

        start = time.perf_counter()
        pending = []
        for i in range(total):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            pending.append(asyncio.create_task(post()))
        await asyncio.gather(*pending)
    if len(answered) != total:
        raise RuntimeError(f"only {len(answered)} of {total} creates answered 201")
    return answered


async def _ids_done(database_url: str, ids: list[str]) -> bool:
    done = await _count(
        database_url,
        "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[]) AND status = 'DONE'",
        ids,
    )
    return done == len(ids)


async def _latencies(st: Stage, answered: list[tuple[str, float]]) -> Result:
    # The answered tasks themselves: other tasks on the stage (another queue's) may be
    # DONE too, and must not end the wait early.
    ids = [i for i, _ in answered]
    await wait_until(lambda: _ids_done(st.database_url, ids), within=60, interval=0.1)
    conn = await asyncpg.connect(st.database_url)
    try:
        # Each timestamp is its transaction's start (now()): created_at the api's
        # insert, published_at the relay's claim, started_at the consumer's claim,
        # finished_at the transaction that writes the result. So each stage below holds
        # the commit that ends the previous transaction, and what waits for it.
        rows = await conn.fetch(
            "SELECT t.id::text, extract(epoch FROM t.started_at) AS started,"
            " extract(epoch FROM t.started_at - t.created_at) AS to_start,"
            " extract(epoch FROM t.finished_at - t.created_at) AS to_done,"
            " extract(epoch FROM o.published_at - t.created_at) AS to_relay,"
            " extract(epoch FROM t.started_at - o.published_at) AS relay_to_start,"
            " extract(epoch FROM t.finished_at - t.started_at) AS start_to_done"
            " FROM tasks t JOIN outbox o ON o.task_id = t.id WHERE t.id = ANY($1::uuid[])",
            ids,
        )
    finally:
        await conn.close()
    by_id = {r["id"]: r for r in rows}
    stages = {
        stage: [float(by_id[i][stage]) * 1000 for i, _ in answered]
        for stage in ("to_relay", "relay_to_start", "start_to_done")
    }
    # Server side, by the database's clock: from the insert (the 201 follows its commit
    # at once) to the claim that starts the handler, and on to the committed result.
    to_start = [float(by_id[i]["to_start"]) * 1000 for i, _ in answered]
    to_done = [float(by_id[i]["to_done"]) * 1000 for i, _ in answered]
    # Client side: from the moment the load generator read the 201. Its own scheduling
    # delays on a 2-core box make this one noisier, even negative.
    client = [(float(by_id[i]["started"]) - t) * 1000 for i, t in answered]
    return {
        "tasks": len(answered),
        "start_p50_ms": percentile(to_start, 50),
        "start_p99_ms": percentile(to_start, 99),
        "done_p50_ms": percentile(to_done, 50),
        "done_p99_ms": percentile(to_done, 99),
        "client_201_to_start_p50_ms": percentile(client, 50),
        "client_201_to_start_p99_ms": percentile(client, 99),
        # insert -> relay's claim (the api's commit, the wake-up, the relay's wait);
        # relay's claim -> consumer's claim (publish, confirm, the relay's commit);
        # consumer's claim -> result (the claim's commit, the handler, the batch).
        "stages_p50_ms": {k: percentile(v, 50) for k, v in stages.items()},
        "stages_p99_ms": {k: percentile(v, 99) for k, v in stages.items()},
    }


async def end_to_end(rate: float, seconds: float, sustained_seconds: float) -> Result:
    """Latency at a fixed arrival rate, with and without LISTEN, and full-pipeline throughput."""
    result: Result = {"rate": rate}
    async with stage("e2e") as st:
        result["baseline_aio_pika"] = await asyncio.to_thread(
            _rawamqp,
            "latency",
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--queue",
            st.broker.queue_name + ".raw",
        )
    for name, extra in (("listen", {}), ("poll_only", {"RELAY_LISTEN": "false"})):
        async with stage("e2e") as st:
            port = _free_port()
            procs = [
                await taskbox("api", st.env, API_PORT=str(port), API_ACCESS_LOG="false").start(),
                await taskbox("relay", st.env, **extra).start(),
                await taskbox("consumer", st.env).start(),
            ]
            try:
                await asyncio.sleep(1.0)
                url = f"http://127.0.0.1:{port}/api/v1/tasks"
                duration = seconds if name == "listen" else min(seconds, 5.0)
                answered = await _open_loop(url, rate, duration)
                result[name] = await _latencies(st, answered)
                if name == "listen":
                    result["sustained"] = await _sustained(st, url, sustained_seconds, procs)
            finally:
                for proc in reversed(procs):
                    await proc.stop()
    result["targets_ms"] = {
        "start_p50": 3,
        "start_p99": 10,
        "done_p99": 15,
        "poll_only_bound": 1000,
    }
    return result


async def _sustained(st: Stage, url: str, seconds: float, procs: list[Process]) -> Result:
    before = await _count(st.database_url, "SELECT count(*) FROM tasks")
    cpu_before = [p.cpu_seconds() for p in procs]
    await _wrk(url, seconds)
    created = await _count(st.database_url, "SELECT count(*) FROM tasks")
    await wait_until(lambda: _all_done(st.database_url, created), within=300, interval=0.1)
    cpu = [p.cpu_seconds() - c for p, c in zip(procs, cpu_before, strict=True)]
    span = await _value(
        st.database_url,
        "SELECT extract(epoch FROM max(finished_at) - min(created_at)) FROM tasks"
        " WHERE created_at > (SELECT max(created_at) FROM tasks) - make_interval(secs => $1)",
        seconds + 1,
    )
    tasks = created - before
    return {
        "tasks": tasks,
        "tasks_s": tasks / float(span),
        "cpu_ms_per_task": {
            name: 1000 * c / tasks
            for name, c in zip(("api", "relay", "consumer"), cpu, strict=True)
        },
    }


# -- 6. memory ------------------------------------------------------------------------------


async def memory(total: int, checkpoint: int, chunk: int = 5000) -> Result:
    """RSS of relay and consumer after ``checkpoint`` and after ``total`` tasks.

    Both counts must be multiples of ``chunk``.
    """
    async with stage("memory") as st:
        relay = await taskbox("relay", st.env).start()
        consumer = await taskbox("consumer", st.env).start()
        samples: dict[str, dict[str, float]] = {}
        try:
            conn = await asyncpg.connect(st.database_url)
            try:
                fed = 0
                while fed < total:
                    await conn.execute(SEED_TASKS, chunk, "NEW")
                    await conn.execute("SELECT pg_notify($1, '')", st.channel)
                    fed += chunk
                    # a steady load with a bounded backlog rather than one flood
                    await wait_until(lambda fed=fed: _all_done(st.database_url, fed), within=120)
                    if fed in (checkpoint, total):
                        samples[str(fed)] = {
                            "relay_mib": relay.rss_mib(),
                            "consumer_mib": consumer.rss_mib(),
                        }
            finally:
                await conn.close()
            cpu = {"relay": relay.cpu_seconds(), "consumer": consumer.cpu_seconds()}
        finally:
            await consumer.stop()
            await relay.stop()
    first, last = samples[str(checkpoint)], samples[str(total)]
    return {
        "rss_mib": samples,
        "relay_growth": last["relay_mib"] / first["relay_mib"] - 1,
        "consumer_growth": last["consumer_mib"] / first["consumer_mib"] - 1,
        "target_growth": 0.10,
        "cpu_ms_per_task": {k: 1000 * v / total for k, v in cpu.items()},
    }


# -- 7. queue isolation ------------------------------------------------------------------

SLOW_POOL = 4  # the slow queue's concurrency: its handler threads too (HANDLER_THREADS > 4)
ISOLATION_ENV = {
    "TASK_MODULES": "bench.queue_tasks:app",
    "CONSUMER_QUEUES": f"default:50,{SLOW_QUEUE}:{SLOW_POOL}",
}
ISOLATION_TARGET = 1.2  # issue 15: default's p99 under slow load within 1.2x of without


async def isolation(
    rate: float, seconds: float, slow_tasks: int, slow_seconds: float, pairs: int = 2
) -> Result:
    """``default`` tasks (echo) at a fixed arrival rate through one consumer that also
    serves ``slow``: run A with the slow queue idle, run B with its pool fully busy
    with blocking handlers. Pairs alternate A B A B, so drift on a shared box hits both
    alike; each run is a fresh stage."""
    runs: list[Result] = []
    for _ in range(pairs):
        for load in (0, slow_tasks):
            runs.append(await _isolation_run(rate, seconds, load, slow_seconds))
    ratios = [
        {
            "done_p99": b["done_p99_ms"] / a["done_p99_ms"],
            "start_p99": b["start_p99_ms"] / a["start_p99_ms"],
            # A control: insert -> relay claim happens before any consumer sees the
            # task, so the slow pool cannot lengthen it; what it moves is the box.
            "to_relay_p99": b["stages_p99_ms"]["to_relay"] / a["stages_p99_ms"]["to_relay"],
        }
        for a, b in zip(runs[::2], runs[1::2], strict=True)
    ]
    idle_p99 = [run["done_p99_ms"] for run in runs[::2]]
    return {
        "rate": rate,
        "seconds": seconds,
        "slow_tasks": slow_tasks,
        "slow_seconds": slow_seconds,
        "slow_pool": SLOW_POOL,
        "runs": runs,
        "ratios": ratios,
        "target_ratio": ISOLATION_TARGET,
        "isolated": all(r["done_p99"] <= ISOLATION_TARGET for r in ratios),
        # The A runs against each other: what the box's noise alone does to the p99,
        # the yardstick for reading B / A.
        "idle_p99_spread": max(idle_p99) / min(idle_p99),
        "slow_busy_throughout": all(r["slow"]["busy"] for r in runs[1::2]),
    }


async def _isolation_run(
    rate: float, seconds: float, slow_tasks: int, slow_seconds: float
) -> Result:
    """One run: api, relay and one consumer serving both queues; ``slow_tasks`` of
    ``slow_seconds`` each fill the slow pool first (none: run A)."""
    async with stage("isolation", queues=(SLOW_QUEUE,)) as st:
        env = {**st.env, **ISOLATION_ENV}
        port = _free_port()
        procs = [
            await taskbox("api", env, API_PORT=str(port), API_ACCESS_LOG="false").start(),
            await taskbox("relay", env).start(),
            await taskbox("consumer", env).start(),
        ]
        try:
            await asyncio.sleep(1.0)
            base = f"http://127.0.0.1:{port}/api/v1/tasks"
            # Until a first round of default tasks is DONE, the consumer may still be
            # connecting: without this, A's first second measures start-up, not load.
            warm = await _open_loop(base, rate, 1.0)
            await wait_until(
                lambda: _ids_done(st.database_url, [i for i, _ in warm]), within=60, interval=0.1
            )
            if slow_tasks:
                await _fill_slow_pool(st, base, slow_tasks, slow_seconds)
            # Sampled in both runs, so that the load generator's process does the same
            # work in A as in B.
            sampler = _SlowSampler(st.database_url)
            await sampler.start()
            try:
                answered = await _open_loop(base, rate, seconds)
                result = await _latencies(st, answered)
            finally:
                samples = await sampler.stop()
        finally:
            for proc in reversed(procs):
                await proc.stop()
    result["slow_load"] = bool(slow_tasks)
    result["slow"] = _slow_summary(samples)
    return result


async def _fill_slow_pool(st: Stage, base: str, tasks: int, seconds: float) -> None:
    """Create ``tasks`` slow tasks over HTTP and wait until the pool runs SLOW_POOL."""
    task = {"type": SLOW_TYPE, "payload": {"seconds": seconds}}
    async with httpx.AsyncClient(timeout=30) as client:
        for offset in range(0, tasks, MAX_BATCH):
            batch = [task] * min(MAX_BATCH, tasks - offset)
            response = await client.post(f"{base}/batch", json={"tasks": batch})
            response.raise_for_status()

    conn = await asyncpg.connect(st.database_url)
    try:

        async def pool_full() -> bool:
            return (await _slow_statuses(conn)).get("PROCESSING", 0) >= SLOW_POOL

        await wait_until(pool_full, within=30, interval=0.05)
    finally:
        await conn.close()


async def _slow_statuses(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT status, count(*) FROM tasks WHERE queue = $1 GROUP BY status", SLOW_QUEUE
    )
    return {r["status"]: r["count"] for r in rows}


class _SlowSampler:
    """The slow queue's tasks by status every ``interval`` seconds, through the
    measurement: the proof that its pool stayed busy the whole time."""

    def __init__(self, database_url: str, interval: float = 0.1) -> None:
        self._database_url = database_url
        self._interval = interval
        self._samples: list[dict[str, int]] = []
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        conn = await asyncpg.connect(self._database_url)
        self._task = asyncio.create_task(self._run(conn))

    async def _run(self, conn: asyncpg.Connection) -> None:
        # Stopped by the event, never cancelled mid-query: the last sample is taken
        # after the stop, at the end of the measurement.
        try:
            while True:
                self._samples.append(await _slow_statuses(conn))
                if self._stopping.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._interval)
        finally:
            await conn.close()

    async def stop(self) -> list[dict[str, int]]:
        assert self._task is not None
        self._stopping.set()
        await self._task
        return self._samples


def _slow_summary(samples: list[dict[str, int]]) -> Result:
    running = [s.get("PROCESSING", 0) for s in samples]
    end = samples[-1]
    waiting = end.get("NEW", 0) + end.get("PENDING", 0)
    full = sum(1 for r in running if r >= SLOW_POOL)
    return {
        "samples": len(samples),
        "processing_min": min(running),
        "processing_max": max(running),
        "full_share": full / len(samples),
        "processing_at_end": end.get("PROCESSING", 0),
        "waiting_at_end": waiting,
        "done_at_end": end.get("DONE", 0),
        # Work still waited at the end (so it never ran out), and the pool was full in
        # all but the odd sample: one that falls between a task's DONE commit and the
        # claim of the next sees slots free for that moment, more often on a busy box.
        "busy": waiting > 0 and full / len(samples) >= 0.9,
    }


def run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
