"""``taskbox relay`` (``python -m taskbox.relay``): the outbox relay until SIGTERM/SIGINT,
or an operator command.

python -m taskbox.relay [run]        the relay (the default)
python -m taskbox.relay replay ...   send tasks through the outbox again (see --help)
python -m taskbox.relay cleanup      one retention sweep now
python -m taskbox.relay status       one screen on tasks, outbox, queues, schedules
python -m taskbox.relay queues ...   list, show, pause and resume queues (see --help)
python -m taskbox.relay tasks ...    cancel or retry every task a filter selects (see --help)
python -m taskbox.relay schedules .. list, show, pause, resume, run or delete schedules
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

import aio_pika
from opentelemetry.trace import Tracer
from pydantic import ValidationError

from taskbox.broker.topology import TopologyMismatch
from taskbox.db.pool import open_pool
from taskbox.db.schedules import ScheduleDefinition
from taskbox.relay import queue_commands, replay, schedule_commands, status, task_commands
from taskbox.relay.housekeeping import Housekeeper, cleanup
from taskbox.relay.listener import OutboxListener
from taskbox.relay.metrics import RelayMetrics
from taskbox.relay.monitoring import observe, refresh_backlog
from taskbox.relay.relay import OutboxRelay, open_broker
from taskbox.relay.scheduler import InvalidCodeSchedule, Scheduler, declared_schedules
from taskbox.relay.settings import RelaySettings
from taskbox.relay.webhooks import DeliveryWorker
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
from taskbox.webhooks import WEBHOOK_CHANNEL

log = logging.getLogger("taskbox.relay")

EXIT_USAGE = 2


def code_schedules(settings: RelaySettings) -> list[ScheduleDefinition]:
    """The schedules the task modules declare, checked; raises InvalidCodeSchedule
    (or RuntimeError for a task module that cannot be imported)."""
    if not settings.scheduler_enabled:
        return []
    registry = load_registry(settings.task_modules, builtin_types=settings.builtin_task_types)
    return declared_schedules(registry, settings.default_max_attempts)


async def serve(
    settings: RelaySettings,
    tracer: Tracer | None = None,
    declared: list[ScheduleDefinition] | None = None,
) -> None:
    declared = declared or []
    shutdown = Shutdown()
    shutdown.install()
    metrics = RelayMetrics()
    probes = Probes()
    server = await start_probe_server(
        metrics.registry, probes, settings.metrics_host, settings.relay_metrics_port
    )
    pool = await open_pool(settings)
    connection, publisher = await connect_with_retry(
        "RabbitMQ", lambda: open_broker(settings), (OSError, aio_pika.exceptions.AMQPError)
    )
    wake = asyncio.Event()
    relay = OutboxRelay(pool, publisher, settings, wake, metrics, tracer)
    background: dict[str, Coroutine[Any, Any, None]] = {}
    # The delivery worker's own wake-up, on its own channel: a webhook NOTIFY must not
    # start an outbox drain, nor an outbox one a look for deliveries.
    webhook_wake = asyncio.Event()
    channels = {WEBHOOK_CHANNEL: webhook_wake} if settings.webhook_delivery else {}
    listener = None
    if settings.relay_listen:
        listener = OutboxListener(settings, wake, settings.relay_listen_check_interval, channels)
        background["listener"] = listener.run()
    if settings.retention_interval > 0:
        background["housekeeping"] = Housekeeper(settings, metrics).run()
    scheduler = None
    if settings.scheduler_enabled:
        scheduler = Scheduler(settings, declared, wake, metrics)
        background["scheduler"] = scheduler.run()
    if settings.webhook_delivery:
        background["webhooks"] = DeliveryWorker(pool, settings, webhook_wake, metrics).run()
    if server is not None:
        observe(probes, settings, metrics, pool, connection, relay, listener, scheduler)
        background["metrics"] = server.serve()
        background["backlog"] = refresh_backlog(pool, metrics, settings.relay_backlog_interval)
    log.info(
        "relay running: batch %d, poll every %.1fs, LISTEN %s, scheduler %s, webhooks %s",
        settings.relay_batch_size,
        settings.relay_poll_interval,
        "on" if settings.relay_listen else "off",
        f"candidate ({len(declared)} code schedules)" if settings.scheduler_enabled else "off",
        "on" if settings.webhook_delivery else "off",
    )
    try:
        await supervise(relay.run(shutdown.requested), background)
    finally:
        if server is not None:
            await server.close()
        await connection.close()
        await pool.close()
    log.info("relay stopped; published %d rows", relay.published_total)


def build_parser(command_prog: str | None = None) -> argparse.ArgumentParser:
    """``command_prog`` names the command in each subcommand's usage line (``taskbox
    replay``) for callers that run one subcommand under a name of their own."""
    parser = argparse.ArgumentParser(
        prog="python -m taskbox.relay",
        description="The Taskbox outbox relay, and the operator's commands around the outbox.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", prog=command_prog, help="run the relay (the default)")
    replay.configure_parser(
        commands.add_parser(
            "replay",
            prog=command_prog,
            help="send tasks through the outbox again",
            description=replay.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    commands.add_parser(
        "cleanup",
        prog=command_prog,
        help="delete what OUTBOX_RETENTION / TASK_RETENTION allow, now",
        description="One retention sweep, as the relays' housekeeping loop runs it.",
    )
    status_parser = commands.add_parser(
        "status",
        prog=command_prog,
        help="one screen: tasks by status, outbox backlog and lag, queue depths",
    )
    status_parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    queue_commands.configure_parser(
        commands.add_parser(
            "queues",
            prog=command_prog,
            help="list, show, pause and resume queues",
            epilog=queue_commands.EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    task_commands.configure_parser(
        commands.add_parser(
            "tasks",
            prog=command_prog,
            help="cancel or retry every task a filter selects, audited",
            description=task_commands.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    schedule_commands.configure_parser(
        commands.add_parser(
            "schedules",
            prog=command_prog,
            help="list, show, pause, resume, run now or delete periodic tasks",
            description=schedule_commands.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def main(argv: list[str] | None = None, command_prog: str | None = None) -> int:
    parser = build_parser(command_prog)
    args = parser.parse_args(argv)
    command = args.command or "run"
    if command == "replay":
        replay.check_arguments(args.replay_parser, args)
    if command == "schedules":
        schedule_commands.check_arguments(args.schedules_parser, args)
    if command == "tasks":
        task_commands.check_arguments(args.tasks_parser, args)
    try:
        settings = RelaySettings()
    except ValidationError as exc:
        print(describe_invalid(exc), file=sys.stderr)
        return EXIT_USAGE
    configure(settings.log_level, settings.log_format)
    if command == "replay":
        return asyncio.run(replay.replay(args, settings))
    if command == "cleanup":
        return asyncio.run(cleanup(settings))
    if command == "status":
        return asyncio.run(status.status(settings, as_json=args.json))
    if command == "queues":
        return asyncio.run(queue_commands.run(args, settings))
    if command == "schedules":
        return asyncio.run(schedule_commands.run(args, settings))
    if command == "tasks":
        return asyncio.run(task_commands.run(args, settings))
    try:
        declared = code_schedules(settings)
    except (InvalidCodeSchedule, RuntimeError) as exc:
        log.critical("%s", exc)
        return EXIT_USAGE
    tracing = start_tracing(settings, "taskbox-relay")
    try:
        run_service(serve(settings, tracing.tracer, declared))
    except LoopDied:
        return EXIT_LOOP_DIED
    except PortUnavailable as exc:
        log.critical("%s; set RELAY_METRICS_PORT to a free port, or 0 to turn it off", exc)
        return EXIT_USAGE
    except TopologyMismatch as exc:
        log.critical("%s", exc)
        return EXIT_USAGE
    finally:
        tracing.shutdown()  # the spans of the last batches, before the process ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
