"""Publishing through aio-pika's public API: the fallback of ``broker.pipeline``.

``broker.pipeline`` writes a batch of publishes as one write on aiormq's channel, which
leans on aiormq's internal bookkeeping (bounded in pyproject.toml to the minor version
tested). With ``AMQP_PIPELINE=false`` the relay publishes here instead: each message
through ``Exchange.publish``, all of a batch in flight at once, each with its own
publisher confirm. Slower (aio-pika converts and writes every message on its own), but
nothing here goes below aio-pika's documented API, so an aiormq release that changes
its internals cannot break it.

``publish_each`` keeps ``pipeline.publish_many``'s contract, so the relay reads the
results the same way: one entry per message, in order, the broker's ``Basic.Ack`` or
the error that refused that message (aiormq's ``DeliveryError`` for a nack or the return
of an unroutable ``mandatory`` message, ``TimeoutError`` for a confirm that did not come
in time, the marshalling error of properties AMQP cannot encode); any other error (a
channel or connection that went away) is the broker's, and the relay treats it so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import aio_pika
from pamqp.commands import Basic

from taskbox.broker.pipeline import Message


class ExchangeSource(Protocol):
    """aio-pika's channel: hands out an exchange object by name."""

    async def get_exchange(self, name: str, *, ensure: bool = True) -> Any: ...


def to_aio_pika(message: Message) -> aio_pika.Message:
    """The same message as aio-pika's own type, every AMQP property carried over
    (a unit test compares the properties aio-pika sends with the original's)."""
    properties: Basic.Properties = message.properties
    return aio_pika.Message(
        message.body,
        headers=properties.headers,
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        delivery_mode=properties.delivery_mode,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        # AMQP carries milliseconds as text; aio-pika takes seconds
        expiration=int(properties.expiration) / 1000 if properties.expiration else None,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        type=properties.message_type,
        user_id=properties.user_id,
        app_id=properties.app_id,
    )


async def publish_each(
    channel: ExchangeSource,
    messages: Sequence[Message],
    *,
    exchange: str,
    routing_key: str,
    within: float,
) -> list[Any]:
    """Publish ``messages`` (``mandatory``, on a channel in confirm mode), all at once,
    and wait up to ``within`` seconds for each confirm. See the module docstring for
    what each entry of the result is."""
    target = await channel.get_exchange(exchange, ensure=False)  # declared at start
    # A publish aiormq cancels (its channel closing) comes back as a CancelledError
    # entry, which the relay reads as the broker going away, as with publish_many.
    outcomes = await asyncio.gather(
        *(
            target.publish(
                to_aio_pika(m), m.routing_key or routing_key, mandatory=True, timeout=within
            )
            for m in messages
        ),
        return_exceptions=True,
    )
    return list(outcomes)
