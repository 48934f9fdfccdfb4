"""Exchanges and queues, declared identically (and idempotently) by relay and consumer.

Tasks go to a durable direct exchange, routed to one durable queue per Taskbox queue
(``taskbox.runtime.queues``): QUEUE_NAME for ``default``, ``<QUEUE_NAME>.<queue>`` for
another, each bound with its own name as the routing key and declared with the same
arguments (dead-lettering, type, priorities). The relay declares a queue on its first
publish to it (``QueueDeclarer``), so tasks of a queue no consumer serves yet wait in it.

Messages the consumer rejects (unparseable, naming no task), and those the broker gives
up on (a quorum queue's x-delivery-limit), are dead-lettered through a fanout exchange into two
queues: the dead-letter queue, where an operator can inspect them, and its ``.watch``
copy, which the consumers read to send a dead-lettered task again through the outbox
(``consumer.dead_letters``), so that no task waits for a message the broker dropped.

The task queue is a priority queue (x-max-priority, 9 by default for a classic queue),
so a message published with a higher priority is delivered before waiting ones of
lower priority. RabbitMQ fixes a queue's arguments when it is created: a queue that
exists with other arguments (declared before priorities, or as another type) refuses
the declaration, and the process stops with a message saying what to do. One case is
let through: with QUEUE_MAX_PRIORITY unset, a queue an older Taskbox declared without
priorities is used as it is, with a warning (``fit_existing_queue``), so that an
upgrade does not stop every relay and consumer until an operator acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aio_pika.exceptions import ChannelPreconditionFailed

from taskbox.broker.settings import BrokerSettings
from taskbox.runtime.queues import DEFAULT_QUEUE, amqp_queue_name

log = logging.getLogger(__name__)

S = TypeVar("S", bound=BrokerSettings)


@dataclass(frozen=True, slots=True)
class Topology:
    exchange: AbstractExchange
    queue: AbstractQueue
    dead_letter_queue: AbstractQueue
    dead_letter_watch: AbstractQueue
    routing_key: str


class TopologyMismatch(RuntimeError):
    """A queue or exchange exists with arguments other than the ones Taskbox declares,
    or a Taskbox queue's AMQP name is taken by one of Taskbox's other queues."""


def queue_arguments(settings: BrokerSettings) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "x-queue-type": settings.queue_type,
        "x-dead-letter-exchange": settings.dead_letter_exchange,
    }
    if settings.max_priority:
        arguments["x-max-priority"] = settings.max_priority
    if settings.queue_type == "quorum" and settings.queue_delivery_limit is not None:
        arguments["x-delivery-limit"] = settings.queue_delivery_limit
    if settings.queue_type == "quorum" and settings.queue_dead_letter_strategy == "at-least-once":
        # At-most-once (the default) drops a dead letter the dead-letter queues did not
        # take (their leader away, say); at-least-once keeps it in the task queue until
        # they confirm, and RabbitMQ honours it only with reject-publish overflow (with
        # drop-head it falls back to at-most-once). Without a length limit, overflow
        # never happens, so reject-publish costs nothing.
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return arguments


async def _queue_accepts(
    connection: AbstractConnection, name: str, arguments: dict[str, Any]
) -> bool:
    """Whether RabbitMQ takes a declaration of ``name`` with ``arguments`` (creating the
    queue if it is missing). A refusal closes the channel, so each try has its own."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed:
        return False
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return True


async def fit_existing_queue(connection: AbstractConnection, settings: S) -> S:
    """``settings``, or, when QUEUE_MAX_PRIORITY is unset and the task queue exists
    without priorities (declared by a Taskbox from before them), the same settings with
    priorities off, and a warning.

    RabbitMQ cannot add x-max-priority to an existing queue; recreating it means
    draining it first, which is an operator's decision, not something to force by
    refusing to start. An explicit QUEUE_MAX_PRIORITY stays strict: ``declare`` then
    refuses the mismatch with what to do.
    """
    if settings.queue_max_priority is not None or not settings.max_priority:
        return settings
    if await _queue_accepts(connection, settings.queue_name, queue_arguments(settings)):
        return settings
    plain = settings.model_copy(update={"queue_max_priority": 0})
    if not await _queue_accepts(connection, settings.queue_name, queue_arguments(plain)):
        return settings  # some other mismatch: declare() says what
    log.warning(
        "queue %r exists without priorities (x-max-priority), as an older Taskbox "
        "declared it: using it as it is, so task priorities are NOT honoured. To turn "
        "them on, drain the queue, delete it (rabbitmqctl delete_queue %s) and restart; "
        "set QUEUE_MAX_PRIORITY=0 to keep it and silence this warning",
        settings.queue_name,
        settings.queue_name,
    )
    return plain


async def _declare_queue(
    channel: AbstractChannel, name: str, arguments: dict[str, Any]
) -> AbstractQueue:
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed as exc:
        raise TopologyMismatch(
            f"RabbitMQ refused to declare queue {name!r} with {arguments}: {exc}. The queue "
            "exists with other arguments (made by an older Taskbox, or with another "
            "QUEUE_TYPE, QUEUE_MAX_PRIORITY, QUEUE_DELIVERY_LIMIT or "
            "QUEUE_DEAD_LETTER_STRATEGY). Either set those settings to match it, or "
            f"drain it and delete it (rabbitmqctl delete_queue {name}) so that it is "
            "declared anew, or point QUEUE_NAME at a new queue."
        ) from None


async def _declare_exchange(
    channel: AbstractChannel, name: str, kind: aio_pika.ExchangeType, setting: str
) -> AbstractExchange:
    try:
        return await channel.declare_exchange(name, kind, durable=True)
    except ChannelPreconditionFailed as exc:
        # Permanent, like a queue's mismatch: retrying it as an unreachable broker
        # would only say the wrong thing for two minutes.
        raise TopologyMismatch(
            f"RabbitMQ refused to declare exchange {name!r} as a durable {kind.value} "
            f"exchange: {exc}. It exists with another type or durability (made by "
            f"something else). Point {setting} at another name, or, if nothing else uses "
            f"it, delete it (rabbitmqadmin delete exchange name={name}, or the management "
            "UI) so that it is declared anew."
        ) from None


async def declare_task_queue(
    channel: AbstractChannel, settings: BrokerSettings, queue: str, exchange: str
) -> AbstractQueue:
    """The AMQP queue of Taskbox queue ``queue``, declared with the task queue's
    arguments (dead-lettering, type, priorities) and bound to ``exchange`` with its own
    name as the routing key."""
    name = amqp_queue_name(settings.queue_name, queue)
    if name in (settings.dead_letter_queue, settings.dead_letter_watch_queue):
        # Declared as a task queue it would be refused (other arguments) or, worse,
        # consumed from as one: dead letters run as tasks, tasks read as dead letters.
        raise TopologyMismatch(
            f"Taskbox queue {queue!r} maps to the AMQP queue {name!r}, which is a dead-letter "
            "queue (DEAD_LETTER_QUEUE): give the queue another name, or change QUEUE_NAME "
            "or DEAD_LETTER_QUEUE"
        )
    declared = await _declare_queue(channel, name, queue_arguments(settings))
    await declared.bind(exchange, routing_key=name)
    return declared


class QueueDeclarer:
    """Declares each Taskbox queue's AMQP queue once per process, on its first use.

    The relay calls it before it publishes to a queue: a queue no consumer serves yet
    then exists and holds its tasks, instead of the broker returning every message as
    unroutable. Declarations go on a channel of their own, since a refused one (the
    queue exists with other arguments) closes its channel, and the publishing channel
    must not go with it.
    """

    def __init__(
        self, connection: AbstractConnection, settings: BrokerSettings, exchange: str
    ) -> None:
        self._connection = connection
        self._settings = settings
        self._exchange = exchange
        self._channel: AbstractChannel | None = None
        self._declared: set[str] = {DEFAULT_QUEUE}  # declare() made it at start
        # Batches run concurrently (RELAY_CONCURRENCY): one declaration at a time, so
        # two never open a channel each and leak one.
        self._lock = asyncio.Lock()

    def declared(self, queue: str) -> bool:
        return queue in self._declared

    def forget(self, queue: str) -> None:
        """Declare ``queue`` again before its next publish (a message to it came back
        unroutable: someone deleted the queue)."""
        self._declared.discard(queue)

    async def ensure(self, queue: str) -> None:
        """Declare ``queue`` unless this process has; raises TopologyMismatch when
        RabbitMQ refuses the declaration, an AMQP or connection error when it is away."""
        if queue in self._declared:
            return
        async with self._lock:
            if queue in self._declared:
                return
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel()
            try:
                await declare_task_queue(self._channel, self._settings, queue, self._exchange)
            except TopologyMismatch:
                self._channel = None  # the refusal closed it
                raise
            self._declared.add(queue)
        log.info(
            "declared queue %r for Taskbox queue %r",
            amqp_queue_name(self._settings.queue_name, queue),
            queue,
        )

    async def close(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(Exception):
                await self._channel.close()


async def declare(channel: AbstractChannel, settings: BrokerSettings) -> Topology:
    if settings.queue_type == "quorum":
        log.warning(
            "QUEUE_TYPE=quorum: task priorities are not honoured (RabbitMQ 3.x quorum "
            "queues have none); tasks are delivered in the order they were published, "
            "whatever their priority"
        )
    dlx = await _declare_exchange(
        channel, settings.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, "DEAD_LETTER_EXCHANGE"
    )
    dead = await _declare_queue(
        channel, settings.dead_letter_queue, {"x-queue-type": settings.queue_type}
    )
    await dead.bind(dlx)
    watch = await _declare_queue(
        channel, settings.dead_letter_watch_queue, {"x-queue-type": settings.queue_type}
    )
    await watch.bind(dlx)
    exchange = await _declare_exchange(
        channel, settings.exchange_name, aio_pika.ExchangeType.DIRECT, "EXCHANGE_NAME"
    )
    queue = await _declare_queue(channel, settings.queue_name, queue_arguments(settings))
    # The queue's own name is the routing key: one binding, nothing to configure.
    await queue.bind(exchange, routing_key=settings.queue_name)
    return Topology(exchange, queue, dead, watch, settings.queue_name)
