"""procrastinate 3.10 (psycopg 3) as a peer: ``python -m bench.peers.procrastinate_peer``.

One App on procrastinate's PsycopgConnector (a psycopg_pool pool, its defaults), its one
task on this run's queue; the schema lives in this run's own database, which the suite
creates and drops. Jobs stay in the table as ``succeeded`` (``delete_jobs`` left at its
default, "never"), as a default installation keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import uvloop
from procrastinate import App, PsycopgConnector

from bench.peers import kit
from bench.peers.serve import serve

FILL_CHUNK = 1000

# Jobs one worker runs at once. Each sub-worker fetches its own job with its own query,
# so this also sets the connections in use; 10 stays within the pool's default size.
CONCURRENCY = 10


def _app(dsn: str, queue: str, recorder: kit.Recorder | None = None) -> tuple[App, Any]:
    app = App(connector=PsycopgConnector(conninfo=dsn))

    @app.task(name="bench_noop", queue=queue)
    async def noop(t0: float) -> None:
        if recorder is not None:
            recorder.finished(t0, recorder.started(t0))

    return app, noop


async def setup(dsn: str, queue: str) -> None:
    app, _ = _app(dsn, queue)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
    kit.emit({})


async def fill(dsn: str, queue: str, count: int) -> None:
    app, noop = _app(dsn, queue)
    async with app.open_async():
        for first in range(0, count, FILL_CHUNK):
            await noop.batch_defer_async(
                *({"t0": 0.0} for _ in range(min(FILL_CHUNK, count - first)))
            )
    kit.emit({"filled": count})


async def work(dsn: str, queue: str, count: int, drain: bool) -> None:
    """Run jobs until ``count`` have run (latency), or, with ``drain``, until none is
    left (procrastinate's ``wait=False``: the worker returns once the queue is empty
    and its jobs' statuses are written)."""
    recorder = kit.Recorder(count)
    app, _ = _app(dsn, queue, recorder)
    async with app.open_async():
        kit.ready()
        worker = asyncio.create_task(
            app.run_worker_async(queues=[queue], concurrency=CONCURRENCY, wait=not drain)
        )
        if not drain:
            await recorder.wait()
            worker.cancel()  # procrastinate stops gracefully on cancellation
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    recorder.report()


@asynccontextmanager
async def _enqueuer(
    dsn: str, queue: str
) -> AsyncIterator[Callable[[Any], Coroutine[Any, Any, str]]]:
    app, noop = _app(dsn, queue)
    async with app.open_async():

        async def enqueue(payload: Any) -> str:
            return str(await noop.defer_async(t0=float(payload.get("t0", 0.0))))

        yield enqueue


async def produce(dsn: str, queue: str, rate: float, seconds: float) -> None:
    async with _enqueuer(dsn, queue) as enqueue:
        sent = await kit.open_loop(rate, seconds, lambda t0: enqueue({"t0": t0}))
    kit.emit({"enqueued": sent})


def main() -> None:
    args = kit.parser("python -m bench.peers.procrastinate_peer").parse_args()
    dsn, queue = args.database_url, args.queue
    if args.command == "serve":
        serve(args.port, lambda: _enqueuer(dsn, queue))
        return
    commands = {
        "setup": lambda: setup(dsn, queue),
        "fill": lambda: fill(dsn, queue, args.count),
        "drain": lambda: work(dsn, queue, args.count, drain=True),
        "work": lambda: work(dsn, queue, args.count, drain=False),
        "produce": lambda: produce(dsn, queue, args.rate, args.seconds),
    }
    uvloop.run(commands[args.command]())


if __name__ == "__main__":
    main()
