"""Small AMQP helpers for integration tests against the real RabbitMQ.

- ``topology(settings)``: a connection with the test's exchanges and queues declared,
  exactly as the relay and consumer declare them (so a test can unbind or inspect).
- ``queue_depth(settings)``: how many messages are ready in a queue right now.
- ``take_all(settings)``: remove and return every message in a queue, oldest first.

They open their own short-lived connection, so they never disturb the process under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from taskbox.broker import topology as broker_topology
from taskbox.broker.settings import BrokerSettings


@asynccontextmanager
async def topology(settings: BrokerSettings) -> AsyncIterator[broker_topology.Topology]:
    """Declare the task and dead-letter topology; the objects stay usable inside the block."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        yield await broker_topology.declare(channel, settings)


async def queue_depth(settings: BrokerSettings, queue: str | None = None) -> int:
    """Ready messages in ``queue`` (default: the task queue); the queue must exist."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue or settings.queue_name, passive=True)
        count = declared.declaration_result.message_count
        return int(count or 0)


async def take_all(
    settings: BrokerSettings, queue: str | None = None, timeout: float = 30.0
) -> list[AbstractIncomingMessage]:
    """Remove every message from ``queue`` (default: the task queue) and return them in order.

    Uses basic.get until the queue reports empty, so it returns what had been confirmed
    into the queue by the time it ran; it does not wait for messages still being published.
    """
    taken: list[AbstractIncomingMessage] = []
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection, asyncio.timeout(timeout):
        channel = await connection.channel()
        declared = await channel.declare_queue(queue or settings.queue_name, passive=True)
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
    return taken
