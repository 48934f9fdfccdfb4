"""Celery 5.7 on RabbitMQ as a peer: ``python -m bench.peers.celery_peer COMMAND``.

Durable direct exchange and queue named after this run, persistent messages, publisher
confirms (kombu's ``confirm_publish``: each publish waits for RabbitMQ's ack, as
Taskbox's relay does), ``acks_late`` (a job is acked after its handler returns) and no
result backend. One worker process with the solo pool: one process running jobs, as
Taskbox's consumer is one. Remote control, gossip, mingle and heartbeats are off, so the
worker declares no queues but this run's (the suite deletes those afterwards).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from celery import Celery
from celery.signals import worker_ready
from kombu import Exchange, Queue
from starlette.concurrency import run_in_threadpool

from bench.peers import kit
from bench.peers.serve import serve

# Unacked messages the worker holds: Taskbox's consumer's prefetch (CONSUMER_PREFETCH).
PREFETCH = 200


def _app(amqp_url: str, queue: str, confirm: bool, recorder: kit.Recorder | None = None) -> Any:
    app = Celery("bench_peer", broker=amqp_url)
    app.conf.update(
        task_queues=[Queue(queue, Exchange(queue, type="direct"), routing_key=queue, durable=True)],
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        task_default_delivery_mode="persistent",
        task_acks_late=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"confirm_publish": confirm},
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=PREFETCH,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,  # the suite reads the result line from stdout
    )

    @app.task(name="bench_noop")
    def noop(t0: float = 0.0, **_: Any) -> None:
        if recorder is None:
            return
        if recorder.finished(t0, recorder.started(t0)):
            # Celery has no drain mode: the run ends with the last handler. A warm
            # shutdown (SIGTERM) acks this last job before the worker exits.
            recorder.report()
            os.kill(os.getpid(), signal.SIGTERM)

    return app


def fill(amqp_url: str, queue: str, count: int) -> None:
    """Queue ``count`` jobs, persistent but unconfirmed (only the backlog is measured),
    then wait until RabbitMQ holds them all."""
    app = _app(amqp_url, queue, confirm=False)
    noop = app.tasks["bench_noop"]
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            noop.apply_async(kwargs={"t0": 0.0}, producer=producer)
    with app.connection_for_write() as conn:
        while conn.default_channel.queue_declare(queue, passive=True).message_count < count:
            time.sleep(0.05)
    kit.emit({"filled": count})


def work(amqp_url: str, queue: str, count: int) -> None:
    recorder = kit.Recorder(count)
    app = _app(amqp_url, queue, confirm=True, recorder=recorder)
    worker_ready.connect(lambda **_: kit.ready(), weak=False)
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--loglevel=WARNING",
            f"--queues={queue}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


def produce(amqp_url: str, queue: str, rate: float, seconds: float) -> None:
    """Open loop, as far as a blocking client allows: each apply_async leaves at its
    scheduled time unless the one before is still waiting for its confirm; ``t0`` is
    read just before each call either way."""
    noop = _app(amqp_url, queue, confirm=True).tasks["bench_noop"]
    total = int(rate * seconds)
    start = time.perf_counter()
    for i in range(total):
        time.sleep(max(0.0, start + i / rate - time.perf_counter()))
        noop.apply_async(kwargs={"t0": time.time()})
    kit.emit({"enqueued": total})


@asynccontextmanager
async def _enqueuer(
    amqp_url: str, queue: str
) -> AsyncIterator[Callable[[Any], Coroutine[Any, Any, str]]]:
    noop = _app(amqp_url, queue, confirm=True).tasks["bench_noop"]

    async def enqueue(payload: Any) -> str:
        # apply_async blocks until the confirm: run it where FastAPI runs a sync
        # endpoint, in the threadpool (Celery's producer pool serves the threads).
        result = await run_in_threadpool(noop.apply_async, kwargs=payload)
        return str(result.id)

    yield enqueue


def main() -> None:
    args = kit.parser("python -m bench.peers.celery_peer").parse_args()
    url, queue = args.amqp_url, args.queue
    if args.command == "setup":
        kit.emit({})  # Celery declares its queue itself
    elif args.command == "fill":
        fill(url, queue, args.count)
    elif args.command in ("drain", "work"):
        work(url, queue, args.count)
    elif args.command == "produce":
        produce(url, queue, args.rate, args.seconds)
    else:
        serve(args.port, lambda: _enqueuer(url, queue))


if __name__ == "__main__":
    main()
