"""Following the pauses of the queues a consumer serves (``POST /queues/{name}/pause``).

A paused queue's waiting tasks stay in the outbox (the relay parks them), but what the
relay had already published sits in RabbitMQ: the consumers stop taking it too, so a
pause stops a queue's work within QUEUE_PAUSE_CHECK_INTERVAL rather than after its
whole AMQP backlog has run. One small read per interval per process; the api never
talks to RabbitMQ, so the pause reaches the consumers through Postgres.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Protocol

import aio_pika
import asyncpg

from taskbox.db import queues
from taskbox.db.errors import TRANSIENT_DB_ERRORS

log = logging.getLogger(__name__)


class Pausable(Protocol):
    async def set_paused(self, paused: bool) -> None: ...


async def apply_pauses(pool: asyncpg.Pool, consumers: Mapping[str, Pausable]) -> None:
    """Pause and resume each queue's consumer as ``queue_pauses`` says now. An outage
    keeps each queue as it was: a pause is not lifted, nor one imposed, by a database
    the consumer cannot read."""
    try:
        paused = await queues.paused_queues(pool)
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        # A database not yet migrated (no queue_pauses) or a role without the grant
        # (taskbox roles not rerun) must not stop the consumer either.
        log.warning("could not read which queues are paused: %s", exc)
        return
    for name, consumer in consumers.items():
        try:
            await consumer.set_paused(name in paused)
        except (aio_pika.exceptions.AMQPError, OSError) as exc:
            log.warning("could not follow the pause of queue %s: %r", name, exc)


async def follow_pauses(
    pool: asyncpg.Pool, consumers: Mapping[str, Pausable], interval: float
) -> None:
    """``apply_pauses`` every ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        await apply_pauses(pool, consumers)
