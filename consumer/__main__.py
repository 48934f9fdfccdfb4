"""``taskbox consumer`` (``python -m taskbox.consumer``): run tasks until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aio_pika
from aio_pika.abc import AbstractQueue, AbstractRobustConnection
from opentelemetry.trace import Tracer
from pydantic import ValidationError

from taskbox.broker import connection as broker_connection
from taskbox.broker import pipeline, topology
from taskbox.broker.topology import TopologyMismatch
from taskbox.consumer.dead_letters import DeadLetterWatch
from taskbox.consumer.metrics import ConsumerMetrics
from taskbox.consumer.monitoring import observe
from taskbox.consumer.pausing import apply_pauses, follow_pauses
from taskbox.consumer.presence import presence_loop
from taskbox.consumer.settings import ConsumerSettings
from taskbox.consumer.worker import TaskConsumer
from taskbox.db.pool import open_pool
from taskbox.runtime.lifecycle import (
    EXIT_LOOP_DIED,
    LoopDied,
    Shutdown,
    connect_with_retry,
    run_service,
    supervise,
)
from taskbox.runtime.logs import configure
from taskbox.runtime.probes import PortUnavailable, Probes, start_probe_server
from taskbox.runtime.queues import DEFAULT_QUEUE
from taskbox.runtime.settings import describe_invalid
from taskbox.runtime.telemetry import start_tracing
from taskbox.tasktypes import load_registry

log = logging.getLogger("taskbox.consumer")


async def open_queue(
    settings: ConsumerSettings,
) -> tuple[AbstractRobustConnection, dict[str, AbstractQueue], AbstractQueue]:
    """The connection, the AMQP queue of each Taskbox queue served (by name, declared
    if missing) and the dead-letter watch queue."""
    connection = await broker_connection.connect_robust(
        settings.amqp_urls, client_properties={"connection_name": "taskbox-consumer"}
    )
    try:
        settings = await topology.fit_existing_queue(connection, settings)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.consumer_prefetch)
        declared = await topology.declare(channel, settings)
        queues: dict[str, AbstractQueue] = {}
        for served in settings.served_queues:
            queues[served.name] = (
                declared.queue
                if served.name == DEFAULT_QUEUE
                else await topology.declare_task_queue(
                    channel, settings, served.name, declared.exchange.name
                )
            )
        if settings.amqp_pipeline:
            # Acks go to aiormq's channel in batches (broker.pipeline.send_frames).
            pipeline.check_channel(await channel.get_underlay_channel())
        else:
            log.info("settling messages through aio-pika's public API (AMQP_PIPELINE=false)")
    except BaseException:
        # A retry opens a connection of its own; this one must not linger, reconnecting.
        await connection.close()
        raise
    return connection, queues, declared.dead_letter_watch


async def run_all(runs: list[Coroutine[Any, Any, None]]) -> None:
    """Run every queue's consumer to its end; if one fails, the others are cancelled
    (a crash-like stop: their unacked messages return, the rescue takes their tasks)."""
    tasks = [asyncio.create_task(run) for run in runs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve(settings: ConsumerSettings, tracer: Tracer | None = None) -> None:
    served = settings.served_queues
    # Every type TASK_MODULES registers, not only those of the queues served: routing
    # keeps the others away, but a task keeps the queue it was created on, so after a
    # type moves to another queue its earlier tasks (scheduled, retrying) still arrive
    # here and must run rather than fail as UnknownTaskType.
    registry = load_registry(settings.task_modules, builtin_types=settings.builtin_task_types)
    shutdown = Shutdown()
    shutdown.install()
    metrics = ConsumerMetrics()
    probes = Probes()
    server = await start_probe_server(
        metrics.registry, probes, settings.metrics_host, settings.consumer_metrics_port
    )
    pool = await open_pool(settings)
    connection, queues, dead_letters = await connect_with_retry(
        "RabbitMQ", lambda: open_queue(settings), (OSError, aio_pika.exceptions.AMQPError)
    )
    # The worker id is half of the fence (db.execution): two live processes must never
    # share one, even on hosts that reuse host names and pids (containers, pid 1).
    process_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:16]}"
    # One consumer per queue, each its own concurrency and worker id (recorded on the
    # tasks it runs) and its own handler threads (at most HANDLER_THREADS, no more than
    # its concurrency can use), sharing the database pool: a queue whose plain-def
    # handlers fill their threads (or leave abandoned ones running) never makes another
    # queue's tasks wait for a thread, a wait their timeouts would count.
    threads = {
        queue.name: ThreadPoolExecutor(
            max_workers=min(settings.handler_threads, queue.concurrency),
            thread_name_prefix=f"handler-{queue.name}",
        )
        for queue in served
    }
    consumers = {
        queue.name: TaskConsumer(
            pool,
            registry,
            settings,
            f"{process_id}/{queue.name}",
            metrics,
            tracer,
            concurrency=queue.concurrency,
            threads=threads[queue.name],
            queue=queue.name,
        )
        for queue in served
    }
    background: dict[str, Coroutine[Any, Any, None]] = {}
    for name, consumer in consumers.items():
        suffix = "" if len(consumers) == 1 else f" {name}"
        background[f"completer{suffix}"] = consumer.complete_loop()
        background[f"heartbeat{suffix}"] = consumer.heartbeat_loop()
    # The rescue sweeps every queue's tasks: one loop per process is enough.
    background["rescue"] = next(iter(consumers.values())).rescue_loop()
    background["dead-letter watch"] = DeadLetterWatch(pool, metrics, settings.outbox_channel).run(
        dead_letters
    )
    # Before the first message: a queue paused now is not consumed from at all.
    await apply_pauses(pool, consumers)
    background["pauses"] = follow_pauses(pool, consumers, settings.queue_pause_check_interval)
    background["presence"] = presence_loop(
        pool, [(name, consumer.worker_id) for name, consumer in consumers.items()]
    )
    if server is not None:
        observe(probes, settings, pool, connection, [(queues[n], c) for n, c in consumers.items()])
        background["metrics"] = server.serve()
    log.info(
        "consumer running: queues %s, prefetch %d; task types: %s",
        ", ".join(f"{queue.name} (concurrency {queue.concurrency})" for queue in served),
        settings.consumer_prefetch,
        ", ".join(registry.names()) or "none",
    )
    try:
        await supervise(
            run_all([c.run(queues[n], shutdown.requested) for n, c in consumers.items()]),
            background,
        )
    finally:
        if server is not None:
            await server.close()
        await connection.close()
        await pool.close()
        for executor in threads.values():
            executor.shutdown(wait=False, cancel_futures=True)
    log.info(
        "consumer stopped; %d attempts completed", sum(c.completed for c in consumers.values())
    )


def main(argv: list[str] | None = None, prog: str = "python -m taskbox.consumer") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("command", nargs="?", default="run", choices=["run"])
    parser.parse_args(argv)
    try:
        settings = ConsumerSettings()
    except ValidationError as exc:
        print(describe_invalid(exc), file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    tracing = start_tracing(settings, "taskbox-consumer")
    try:
        run_service(serve(settings, tracing.tracer))
    except LoopDied:
        return EXIT_LOOP_DIED
    except PortUnavailable as exc:
        log.critical("%s; set CONSUMER_METRICS_PORT to a free port, or 0 to turn it off", exc)
        return 2
    except TopologyMismatch as exc:
        log.critical("%s", exc)
        return 2
    finally:
        tracing.shutdown()  # the spans of the last attempts, before the process ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
