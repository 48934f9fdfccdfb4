"""Exchanges and queues, declared identically (and idempotently) by relay and consumer.

Tasks go to a durable direct exchange, routed to one durable queue. Messages the
consumer rejects (unparseable, naming no task) are dead-lettered through a fanout
exchange into the dead-letter queue, where an operator can inspect them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from broker.settings import BrokerSettings


@dataclass(frozen=True, slots=True)
class Topology:
    exchange: AbstractExchange
    queue: AbstractQueue
    dead_letter_queue: AbstractQueue
    routing_key: str


def queue_arguments(settings: BrokerSettings) -> dict[str, Any]:
    return {
        "x-queue-type": settings.queue_type,
        "x-dead-letter-exchange": settings.dead_letter_exchange,
    }


async def declare(channel: AbstractChannel, settings: BrokerSettings) -> Topology:
    dlx = await channel.declare_exchange(
        settings.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead = await channel.declare_queue(
        settings.dead_letter_queue, durable=True, arguments={"x-queue-type": settings.queue_type}
    )
    await dead.bind(dlx)
    exchange = await channel.declare_exchange(
        settings.exchange_name, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(
        settings.queue_name, durable=True, arguments=queue_arguments(settings)
    )
    # The queue's own name is the routing key: one binding, nothing to configure.
    await queue.bind(exchange, routing_key=settings.queue_name)
    return Topology(exchange, queue, dead, settings.queue_name)
