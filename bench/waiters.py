"""``--only waiters``: clients waiting for results, long polls against polling.

One api process (uvicorn) and ``count`` concurrent clients waiting for ``count`` tasks,
twice in the same run, on the same process:

- long polls: each client sends one ``GET /api/v1/tasks/{id}?wait=60``;
- polling: each client sends ``GET /api/v1/tasks/{id}/status`` every ``interval`` s.

While they wait and nothing finishes, the api's CPU seconds are taken over ``idle``
seconds. Then the tasks are finished by direct SQL (no consumer: the api alone is
measured), ``batch`` tasks a statement, a statement every ``pause`` seconds, and each
task's latency is the time from its finishing statement's return (its commit) to the
client seeing it DONE.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg

from bench.harness import Process, percentile, stage, taskbox

Result = dict[str, Any]

# Requests that failed at the transport (retried by the client, as a real one would).
_ERRORS = {"long_poll": 0, "polling": 0}

_SEED = """
INSERT INTO tasks (type, payload, status, started_at, heartbeat_at)
SELECT 'echo', jsonb_build_object('i', g), 'PROCESSING', now(), now()
FROM generate_series(1, $1) AS g
RETURNING id
"""
_FINISH = """
UPDATE tasks SET status = 'DONE', result = '{}'::jsonb, finished_at = now(), updated_at = now()
WHERE id = ANY($1::uuid[]) AND status = 'PROCESSING'
"""


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _finish_all(
    database_url: str, ids: list[uuid.UUID], batch: int, pause: float
) -> dict[uuid.UUID, float]:
    """Finish the tasks a batch at a time; each task's commit time (monotonic)."""
    committed: dict[uuid.UUID, float] = {}
    conn = await asyncpg.connect(database_url)
    try:
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            await conn.execute(_FINISH, chunk)
            now = time.monotonic()
            committed.update(dict.fromkeys(chunk, now))
            await asyncio.sleep(pause)
    finally:
        await conn.close()
    return committed


class _Connection:
    """One keep-alive HTTP/1.1 connection, as cheap a client as asyncio allows: the load
    generator shares the api's two cores, and httpx's per-request cost made the clients,
    not the api, the bottleneck of the polling round."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def get(self, path: str) -> tuple[int, bytes]:
        self._writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self._reader.readexactly(length)

    def close(self) -> None:
        self._writer.close()


_DONE = b'"status":"DONE"'


async def _long_poll(
    port: int, task_id: uuid.UUID, seen: dict[uuid.UUID, float], sent: list[int]
) -> None:
    connection = await _Connection.open(port)
    try:
        while True:
            sent[0] += 1
            status, body = await connection.get(f"/api/v1/tasks/{task_id}?wait=60")
            if status == 200 and _DONE in body:
                seen[task_id] = time.monotonic()
                return
            if status != 200:
                _ERRORS["long_poll"] += 1
                await asyncio.sleep(0.5)
    finally:
        connection.close()


async def _poll(
    port: int,
    task_id: uuid.UUID,
    seen: dict[uuid.UUID, float],
    sent: list[int],
    interval: float,
) -> None:
    connection = await _Connection.open(port)
    try:
        # Spread the first polls over the interval, as independent clients would be.
        await asyncio.sleep(interval * (task_id.int % 1000) / 1000)
        while True:
            started = time.monotonic()
            sent[0] += 1
            status, body = await connection.get(f"/api/v1/tasks/{task_id}/status")
            if status == 200 and _DONE in body:
                seen[task_id] = time.monotonic()
                return
            if status != 200:
                _ERRORS["polling"] += 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
    finally:
        connection.close()


async def _round(
    kind: str,
    api: Process,
    port: int,
    database_url: str,
    count: int,
    idle: float,
    batch: int,
    pause: float,
    interval: float,
) -> Result:
    conn = await asyncpg.connect(database_url)
    try:
        ids = [row["id"] for row in await conn.fetch(_SEED, count)]
    finally:
        await conn.close()
    seen: dict[uuid.UUID, float] = {}
    sent = [0]
    if kind == "long_poll":
        clients = [asyncio.create_task(_long_poll(port, i, seen, sent)) for i in ids]
    else:
        clients = [asyncio.create_task(_poll(port, i, seen, sent, interval)) for i in ids]
    # Every client connected and waiting (or in its polling rhythm) before measuring.
    # (sent[0] counts requests sent; polled here, every 0.1 s, only until all are out)
    async with asyncio.timeout(60):
        while sent[0] < count:  # noqa: ASYNC110 - a counter many tasks bump, not an event
            await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    cpu_before, sent_before = api.cpu_seconds(), sent[0]
    await asyncio.sleep(idle)
    cpu_idle = api.cpu_seconds() - cpu_before
    requests = sent[0] - sent_before
    committed = await _finish_all(database_url, ids, batch, pause)
    async with asyncio.timeout(60 + count / 50):
        await asyncio.gather(*clients)
    latencies = [1000 * (seen[i] - committed[i]) for i in ids]
    return {
        "clients": count,
        "api_cpu_s_while_waiting": cpu_idle,
        "idle_seconds": idle,
        "api_cpu_share_while_waiting": cpu_idle / idle,
        "latency_ms_p50": percentile(latencies, 50),
        "latency_ms_p99": percentile(latencies, 99),
        "latency_ms_max": max(latencies),
        "requests_while_waiting": requests,
        "error_answers": _ERRORS[kind],
    }


async def waiters(
    count: int,
    idle: float = 5.0,
    batch: int = 50,
    pause: float = 0.05,
    interval: float = 0.5,
) -> Result:
    async with stage("waiters") as st:
        port = _port()
        api = await taskbox(
            "api",
            st.env,
            API_PORT=str(port),
            API_ACCESS_LOG="false",
            # Room for every client: the defaults (512 connections, 256 waiters) are a
            # production api's, which spreads this many over several processes.
            API_CONCURRENCY_LIMIT=str(2 * count + 100),
            TASK_WAIT_MAX_WAITERS=str(count + 10),
            API_KEEP_ALIVE_TIMEOUT="120",
        ).start()
        try:
            long_poll = await _round(
                "long_poll", api, port, st.database_url, count, idle, batch, pause, interval
            )
            polling = await _round(
                "polling", api, port, st.database_url, count, idle, batch, pause, interval
            )
        finally:
            await api.stop()
            problems = [line for line in api.output() if "ERROR" in line or "rror" in line]
            if problems:
                print("\n".join(problems[-5:]), flush=True)
    return {
        "clients": count,
        "poll_interval_s": interval,
        "finish_batch": batch,
        "long_poll": long_poll,
        "polling": polling,
    }
