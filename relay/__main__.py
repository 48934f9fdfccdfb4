"""``python -m relay``: run the outbox relay until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

import aio_pika
import asyncpg

from db.pool import create_pool
from relay.listener import OutboxListener
from relay.relay import OutboxRelay, open_broker
from relay.settings import RelaySettings
from runtime.lifecycle import (
    EXIT_LOOP_DIED,
    LoopDied,
    Shutdown,
    connect_with_retry,
    run_service,
    supervise,
)
from runtime.logs import configure

log = logging.getLogger("relay")


async def serve(settings: RelaySettings) -> None:
    shutdown = Shutdown()
    shutdown.install()
    pool = await connect_with_retry(
        "Postgres", lambda: create_pool(settings), (OSError, asyncpg.PostgresError)
    )
    connection, publisher = await connect_with_retry(
        "RabbitMQ", lambda: open_broker(settings), (OSError, aio_pika.exceptions.AMQPError)
    )
    wake = asyncio.Event()
    relay = OutboxRelay(pool, publisher, settings, wake)
    background: dict[str, Coroutine[Any, Any, None]] = {}
    if settings.relay_listen:
        listener = OutboxListener(settings, wake, settings.relay_listen_check_interval)
        background["listener"] = listener.run()
    log.info(
        "relay running: batch %d, poll every %.1fs, LISTEN %s",
        settings.relay_batch_size,
        settings.relay_poll_interval,
        "on" if settings.relay_listen else "off",
    )
    try:
        await supervise(relay.run(shutdown.requested), background)
    finally:
        await connection.close()
        await pool.close()
    log.info("relay stopped; published %d rows", relay.published_total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay", description=__doc__)
    parser.add_argument("command", nargs="?", default="run", choices=["run"])
    parser.parse_args(argv)
    settings = RelaySettings()
    configure(settings.log_level, settings.log_format)
    try:
        run_service(serve(settings))
    except LoopDied:
        return EXIT_LOOP_DIED
    return 0


if __name__ == "__main__":
    sys.exit(main())
