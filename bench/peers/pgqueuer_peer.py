"""pgqueuer 1.6 as a peer: ``python -m bench.peers.pgqueuer_peer COMMAND`` in .venv-peers.

One QueueManager on one asyncpg connection (pgqueuer's own recommended setup), its
entrypoint named after this run's queue; jobs live in this run's own database, which the
suite creates and drops, so pgqueuer's tables and NOTIFY channel are this run's alone.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import uvloop
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, Job, Queries, QueueManager
from pgqueuer.types import QueueExecutionMode

from bench.peers import kit
from bench.peers.serve import serve

FILL_CHUNK = 1000


async def setup(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()
    kit.emit({})


async def fill(dsn: str, queue: str, count: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        payload = json.dumps({"t0": 0}).encode()
        for first in range(0, count, FILL_CHUNK):
            n = min(FILL_CHUNK, count - first)
            await queries.enqueue([queue] * n, [payload] * n, [0] * n)
    finally:
        await conn.close()
    kit.emit({"filled": count})


async def work(dsn: str, queue: str, count: int, batch_size: int, drain: bool) -> None:
    """Run jobs until ``count`` have run (latency), or, with ``drain``, until the queue is
    empty in pgqueuer's own drain mode, which returns once the completions are written."""
    recorder = kit.Recorder(count)
    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(queue)
    async def noop(job: Job) -> None:
        t0 = json.loads(job.payload or b"{}").get("t0", 0)
        recorder.finished(t0, recorder.started(t0))

    async def stop_when_counted() -> None:
        await recorder.wait()
        qm.shutdown.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, qm.shutdown.set)
    kit.ready()
    if drain:
        await qm.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
    else:
        counting = asyncio.create_task(stop_when_counted())
        await qm.run(batch_size=batch_size)
        counting.cancel()
    recorder.report()
    await conn.close()


@asynccontextmanager
async def _pool_enqueuer(
    dsn: str, queue: str
) -> AsyncIterator[Callable[[Any], Coroutine[Any, Any, str]]]:
    pool = await asyncpg.create_pool(dsn)
    queries = Queries(AsyncpgPoolDriver(pool))

    async def enqueue(payload: Any) -> str:
        ids = await queries.enqueue(queue, json.dumps(payload).encode())
        return str(ids[0])

    try:
        yield enqueue
    finally:
        await pool.close()


async def produce(dsn: str, queue: str, rate: float, seconds: float) -> None:
    async with _pool_enqueuer(dsn, queue) as enqueue:
        sent = await kit.open_loop(rate, seconds, lambda t0: enqueue({"t0": t0}))
    kit.emit({"enqueued": sent})


def main() -> None:
    p = kit.parser("python -m bench.peers.pgqueuer_peer")
    p.add_argument("--batch", type=int, default=10, help="jobs a dequeue (pgqueuer's default)")
    args = p.parse_args()
    dsn, queue = args.database_url, args.queue
    if args.command == "serve":
        serve(args.port, lambda: _pool_enqueuer(dsn, queue))
        return
    commands = {
        "setup": lambda: setup(dsn),
        "fill": lambda: fill(dsn, queue, args.count),
        "drain": lambda: work(dsn, queue, args.count, args.batch, drain=True),
        "work": lambda: work(dsn, queue, args.count, args.batch, drain=False),
        "produce": lambda: produce(dsn, queue, args.rate, args.seconds),
    }
    uvloop.run(commands[args.command]())


if __name__ == "__main__":
    main()
