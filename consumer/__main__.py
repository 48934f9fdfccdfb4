"""``taskbox consumer`` (``python -m taskbox.consumer``): run tasks until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import uuid

import aio_pika
from aio_pika.abc import AbstractQueue, AbstractRobustConnection
from opentelemetry.trace import Tracer
from pydantic import ValidationError

from taskbox.broker import pipeline, topology
from taskbox.broker.topology import TopologyMismatch
from taskbox.consumer.dead_letters import DeadLetterWatch
from taskbox.consumer.metrics import ConsumerMetrics
from taskbox.consumer.monitoring import observe
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
from taskbox.runtime.settings import describe_invalid
from taskbox.runtime.telemetry import start_tracing
from taskbox.tasktypes import load_registry

log = logging.getLogger("taskbox.consumer")


async def open_queue(
    settings: ConsumerSettings,
) -> tuple[AbstractRobustConnection, AbstractQueue, AbstractQueue]:
    """The connection, the task queue and the dead-letter watch queue."""
    connection = await aio_pika.connect_robust(
        settings.amqp_url, client_properties={"connection_name": "taskbox-consumer"}
    )
    try:
        settings = await topology.fit_existing_queue(connection, settings)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.consumer_prefetch)
        declared = await topology.declare(channel, settings)
        if settings.amqp_pipeline:
            # Acks go to aiormq's channel in batches (broker.pipeline.send_frames).
            pipeline.check_channel(await channel.get_underlay_channel())
        else:
            log.info("settling messages through aio-pika's public API (AMQP_PIPELINE=false)")
    except BaseException:
        # A retry opens a connection of its own; this one must not linger, reconnecting.
        await connection.close()
        raise
    return connection, declared.queue, declared.dead_letter_watch


async def serve(settings: ConsumerSettings, tracer: Tracer | None = None) -> None:
    registry = load_registry(settings.task_modules, builtin_types=settings.builtin_task_types)
    shutdown = Shutdown()
    shutdown.install()
    metrics = ConsumerMetrics()
    probes = Probes()
    server = await start_probe_server(
        metrics.registry, probes, settings.metrics_host, settings.consumer_metrics_port
    )
    pool = await open_pool(settings)
    connection, queue, dead_letters = await connect_with_retry(
        "RabbitMQ", lambda: open_queue(settings), (OSError, aio_pika.exceptions.AMQPError)
    )
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    consumer = TaskConsumer(pool, registry, settings, worker_id, metrics, tracer)
    background = {
        "completer": consumer.complete_loop(),
        "heartbeat": consumer.heartbeat_loop(),
        "rescue": consumer.rescue_loop(),
        "dead-letter watch": DeadLetterWatch(pool, metrics, settings.outbox_channel).run(
            dead_letters
        ),
    }
    if server is not None:
        observe(probes, settings, pool, connection, queue, consumer)
        background["metrics"] = server.serve()
    log.info(
        "consumer running: concurrency %d, prefetch %d; task types: %s",
        settings.consumer_concurrency,
        settings.consumer_prefetch,
        ", ".join(registry.names()),
    )
    try:
        await supervise(consumer.run(queue, shutdown.requested), background)
    finally:
        if server is not None:
            await server.close()
        await connection.close()
        await pool.close()
    log.info("consumer stopped; %d attempts completed", consumer.completed)


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
