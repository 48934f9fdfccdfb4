"""What every benchmark needs: a scratch database and queue, processes, measurements."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from taskbox.broker.settings import BrokerSettings
from taskbox.db.settings import plain_dsn
from taskbox.runtime.queues import amqp_queue_name

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = plain_dsn(
    os.environ.get("BENCH_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
)
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Stage:
    """A fresh database and fresh broker names for one benchmark."""

    database_url: str
    broker: BrokerSettings
    channel: str

    @property
    def env(self) -> dict[str, str]:
        # Not the OTEL_* of whoever runs the bench: a scenario that traces says so.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.pop("TASKBOX_FAILPOINTS", None)
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "OUTBOX_CHANNEL": self.channel,
                "AMQP_URL": self.broker.amqp_url,
                "EXCHANGE_NAME": self.broker.exchange_name,
                "QUEUE_NAME": self.broker.queue_name,
                "DEAD_LETTER_EXCHANGE": self.broker.dead_letter_exchange,
                "DEAD_LETTER_QUEUE": self.broker.dead_letter_queue,
                "LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def stage(name: str, queues: Iterable[str] = ()) -> AsyncIterator[Stage]:
    """A fresh database and broker names; ``queues``: the Taskbox queues besides
    ``default`` the scenario uses, whose AMQP queues go with the stage too."""
    db = f"taskbox_bench_{name}_{uuid.uuid4().hex[:6]}"
    await _admin(f'CREATE DATABASE "{db}"')
    url = ADMIN_DSN.rsplit("/", 1)[0] + "/" + db
    migrated = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "taskbox.db", "migrate"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
    )
    if migrated.returncode:
        raise RuntimeError(migrated.stderr)
    prefix = f"bench.{name}.{uuid.uuid4().hex[:6]}"
    broker = BrokerSettings(
        amqp_url=AMQP_URL,
        exchange_name=f"{prefix}.x",
        queue_name=f"{prefix}.q",
        dead_letter_exchange=f"{prefix}.dlx",
        dead_letter_queue=f"{prefix}.dead",
    )
    try:
        yield Stage(url, broker, f"bench_{uuid.uuid4().hex[:8]}")
    finally:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            # The task queues and the baselines' own (scenarios name them after the task
            # queue).
            for queue in (
                broker.queue_name,
                broker.dead_letter_queue,
                broker.dead_letter_watch_queue,
                f"{broker.queue_name}.raw",
                f"{broker.queue_name}.raw-priority",
                *(amqp_queue_name(broker.queue_name, queue) for queue in queues),
            ):
                await channel.queue_delete(queue)
            for exchange in (broker.exchange_name, broker.dead_letter_exchange):
                await channel.exchange_delete(exchange)
        await _admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


@dataclass
class Process:
    """A process under measurement: started, sampled from /proc, stopped."""

    args: list[str]
    env: dict[str, str]
    ready: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    cwd: Path = ROOT  # ``python -m taskbox...`` imports the taskbox found here
    log: list[str] = field(default_factory=list)
    _partial: str = ""

    async def start(self, within: float = 30.0) -> Process:
        # Popen returns at once and the output is read without blocking.
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            self.args, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        deadline = time.monotonic() + within
        while self.ready is not None and not any(self.ready in line for line in self._drain()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.args} did not start:\n" + "\n".join(self.log))
            await asyncio.sleep(0.05)
        return self

    def output(self) -> list[str]:
        """Every line the process has written so far (stdout and stderr)."""
        return self._drain()

    def _drain(self) -> list[str]:
        assert self.proc is not None
        assert self.proc.stdout is not None
        data = self.proc.stdout.read() or b""
        # A read ends wherever the pipe did, often inside a line: keep the unfinished
        # end for the next read, so a long line (a peer's JSON result) stays whole.
        lines = (self._partial + data.decode(errors="replace")).split("\n")
        self._partial = lines.pop()
        self.log.extend(line.rstrip("\r") for line in lines)
        return self.log

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss_mib(self) -> float:
        assert self.proc is not None
        pages = int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1])
        return pages * PAGE / 2**20

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(300):
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        else:
            self.proc.kill()
        self._drain()


def taskbox(module: str, env: dict[str, str], **extra: str) -> Process:
    ready = {"api": "Application startup complete", "relay": None, "consumer": None}[module]
    log_level = {"LOG_LEVEL": "INFO"} if module == "api" else {}
    argv = [sys.executable, "-m", f"taskbox.{module}"]
    return Process(argv, {**env, **log_level, **extra}, ready)


async def wait_until(probe: Any, within: float, interval: float = 0.02) -> float:
    """Poll ``await probe()`` until truthy; returns the monotonic time it became so."""
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish in time")
        await asyncio.sleep(interval)
    return time.monotonic()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def machine() -> dict[str, Any]:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        pg = await conn.fetchval("SHOW server_version")
        durable = await conn.fetchval("SHOW synchronous_commit")
        fsync = await conn.fetchval("SHOW fsync")
    finally:
        await conn.close()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        props = connection.transport.connection.server_properties  # type: ignore[union-attr]
        rabbit = props.get("version", "?")
        rabbit = rabbit.decode() if isinstance(rabbit, bytes) else str(rabbit)
    wrk = shutil.which("wrk")
    wrk_version = ""
    if wrk:
        out = await asyncio.to_thread(subprocess.run, [wrk, "-v"], capture_output=True, text=True)
        match = re.search(r"wrk (\S+)", out.stdout + out.stderr)
        wrk_version = match.group(1) if match else "?"
    return {
        "python": platform.python_version(),
        "postgres": pg,
        "postgres_synchronous_commit": durable,
        "postgres_fsync": fsync,
        "rabbitmq": rabbit,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "wrk": wrk_version,
    }
