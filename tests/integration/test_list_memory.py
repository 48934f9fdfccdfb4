"""What slow readers of the task list cost a real api process in memory.

A review found that one ``GET /api/v1/tasks?limit=100`` over tasks with 1 MiB payloads
answered about 100 MB, and that eight clients which read their answers slowly took the
api to 1.6 GB: each answer is built whole and waits in the server's write buffer until
its client reads it. The list now answers summaries (no payload, no result). This test
repeats the review's experiment on ``python -m api`` and prints its resident memory
before, at the peak and after; the figures are in bench/BASELINE.md. The one memory
bound it asserts is loose (the review's case grew by well over a gigabyte); no timing
is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import asyncpg
import pytest

from tests.integration.processes import ServiceProcess, free_port
from tests.integration.test_api_tasks import LIST_BOUND, insert_large_tasks

READERS = 8
TASKS = 100
PAYLOAD_BYTES = 1_048_000  # ~1 MiB of JSON each, as in the review
HOLD_SECONDS = 5.0  # how long each reader dawdles over its answer
READ_CHUNK = 1024  # ... reading this much
READ_EVERY = 0.05  # ... this often
MIB = 1024 * 1024


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in KiB, from /proc/<pid>/status."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


async def slow_reader(port: int, path: str) -> bytes:
    """GET ``path`` and read the answer a kilobyte at a time for HOLD_SECONDS (or until
    it ends); returns what was read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        received = bytearray()
        async with asyncio.timeout(120):  # the first bytes: the answer has been built
            received += await reader.read(READ_CHUNK)
        deadline = time.monotonic() + HOLD_SECONDS
        while time.monotonic() < deadline:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                break
            received += chunk
            await asyncio.sleep(READ_EVERY)
        return bytes(received)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize(
    ("query", "answer_bound"),
    [
        # summaries: each answer is read to its end during the hold
        (f"limit={TASKS}", LIST_BOUND),
        # whole tasks: one ~1 MiB task a page (MAX_PAGE_BYTES), not read to its end
        (f"limit={TASKS}&view=full", None),
    ],
    ids=["summaries", "full-view"],
)
async def test_slow_readers_of_a_list_of_large_tasks_cost_the_api_little_memory(
    service_env: dict[str, str],
    pool: asyncpg.Pool,
    capsys: pytest.CaptureFixture[str],
    query: str,
    answer_bound: int | None,
) -> None:
    await insert_large_tasks(pool, TASKS, PAYLOAD_BYTES)
    port = free_port()
    api = await ServiceProcess("api", service_env, API_PORT=str(port)).start()
    try:
        await api.wait_for("Uvicorn running on")  # listening: logged after the startup
        assert api.proc is not None
        pid = api.proc.pid
        path = f"/api/v1/tasks?{query}"
        # Warm up: the pool's connections, the routes, the JSON writer.
        warm = await slow_reader(port, "/api/v1/tasks?limit=1")
        assert warm.startswith(b"HTTP/1.1 200"), warm[:200]
        before = memory_kib(pid)["VmRSS"]

        peak = before
        readers = [asyncio.create_task(slow_reader(port, path)) for _ in range(READERS)]
        while not all(reader.done() for reader in readers):
            peak = max(peak, memory_kib(pid)["VmRSS"])
            await asyncio.sleep(0.05)
        answers = [reader.result() for reader in readers]
        await asyncio.sleep(1.0)
        after = memory_kib(pid)

        with capsys.disabled():
            print(
                f"\napi RSS, {READERS} slow readers of {path} over {TASKS} tasks of "
                f"{PAYLOAD_BYTES:,}-byte payloads: before {before / 1024:.1f} MiB, "
                f"peak {peak / 1024:.1f} MiB (+{(peak - before) / 1024:.1f}), "
                f"after {after['VmRSS'] / 1024:.1f} MiB; VmHWM {after['VmHWM'] / 1024:.1f} MiB; "
                f"answers of {max(map(len, answers)):,} bytes read"
            )
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            if answer_bound is not None:
                body = answer.partition(b"\r\n\r\n")[2]
                assert len(body) < answer_bound, f"{len(body)} bytes"
        assert (peak - before) * 1024 < 64 * MIB, f"RSS grew by {(peak - before) / 1024:.0f} MiB"
    finally:
        api.kill()
        await api.wait()
