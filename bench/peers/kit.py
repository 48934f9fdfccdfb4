"""What every peer process shares (runs in .venv-peers; standard library only).

A peer module is a small command line: ``setup`` (install its schema), ``fill`` (queue
no-op jobs without running them), ``work`` (one worker that reports once it has run
``--count`` jobs), ``produce`` (enqueue at a fixed rate, open loop) and ``serve`` (a
FastAPI endpoint that enqueues one job a request). Each job's payload carries ``t0``,
the wall-clock time taken just before its enqueue call (0 for backlog jobs), so the
handler can measure enqueue -> start without any clock but the machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

READY = "PEER-READY"
RESULT = "PEER-RESULT "
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """This process's user + system CPU, from the same /proc field the suite reads."""
    with open("/proc/self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def ready() -> None:
    print(READY, flush=True)


def emit(result: dict[str, Any]) -> None:
    print(RESULT + json.dumps(result), flush=True)


class Recorder:
    """Times the handler runs of one worker and reports them.

    The drain rate runs from the first handler start to the end the worker's library
    calls drained (its own drain mode where it has one: completions written), and the
    worker's CPU is read at those two moments: process start-up, connecting and
    declaring stay out of both, as they do for Taskbox's relay and consumer, which are
    up before the backlog is announced to them. Thread-safe, for Celery's threads.
    """

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self._lock = threading.Lock()
        self._finished = 0
        self._first_start = 0.0
        self._first_cpu = 0.0
        self._samples: list[tuple[float, float, float]] = []
        self.done = threading.Event()  # ``expected`` handlers have returned

    def started(self, t0: float) -> float:
        """Call first thing in the handler; pass what it returns to ``finished``."""
        now = time.time()
        with self._lock:
            if not self._first_start:
                self._first_start = now
                self._first_cpu = cpu_seconds()
        return now

    def finished(self, t0: float, started: float) -> bool:
        """Call last thing in the handler; True for the call that completes ``expected``."""
        now = time.time()
        with self._lock:
            if t0:  # a latency job: (t0, enqueue -> start ms, enqueue -> end ms)
                self._samples.append((t0, (started - t0) * 1000, (now - t0) * 1000))
            self._finished += 1
            if self._finished != self.expected:
                return False
        self.done.set()
        return True

    async def wait(self) -> None:
        await asyncio.to_thread(self.done.wait)

    def report(self) -> None:
        """Emit the figures; call once the jobs are completed as the library sees it."""
        with self._lock:
            emit(
                {
                    "jobs": self._finished,
                    "seconds": time.time() - self._first_start,
                    "cpu_seconds": cpu_seconds() - self._first_cpu,
                    "samples": self._samples,
                }
            )


async def open_loop(
    rate: float, seconds: float, enqueue: Callable[[float], Coroutine[Any, Any, Any]]
) -> int:
    """Call ``enqueue(t0)`` ``rate`` times a second whatever the previous calls do (each
    call its own task); ``t0`` is read just before the call. Returns the count."""
    total = int(rate * seconds)
    start = time.perf_counter()
    calls: list[asyncio.Task[Any]] = []
    for i in range(total):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        calls.append(asyncio.create_task(enqueue(time.time())))
    await asyncio.gather(*calls)
    return total


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line all peers share; each reads the options it needs."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("command", choices=["setup", "fill", "drain", "work", "produce", "serve"])
    p.add_argument("--database-url", default="")
    p.add_argument("--amqp-url", default="")
    p.add_argument("--queue", required=True, help="this run's queue (entrypoint) name")
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--port", type=int, default=0)
    return p
