"""Many frames on an aiormq channel as one write: a batch of publishes, each with its own
confirm (the relay), and a batch of acks (the consumer).

aiormq's ``basic_publish`` does, for every message, what a batch needs once: it takes
the channel's lock, starts a timeout, hands its frames to the connection's writer (one
socket write per message) and parks a task on the confirm. Profiled in the relay, that
per-message machinery was over half of its CPU, and the relay drained its backlog at
0.63-0.78x the rate of plain aio-pika publishing. Here a batch takes the lock once,
marshals each message's frames, registers each confirm exactly where ``basic_publish``
registers it (so aiormq's frame reader settles it: ack, nack, or the return of a
``mandatory`` message nobody could route) and sends the whole batch as one write. The
relay then waits once, for all confirms, under one deadline.

This relies on the channel's bookkeeping as aiormq 7 keeps it (``lock``,
``delivery_tag``, ``confirmations``, ``message_id_delivery_tag``, ``write_queue``);
``check_channel`` refuses a channel without it at start, so an upgrade that changes it
fails loudly instead of publishing wrongly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from aiormq.abc import ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

# What a channel must have for publish_many; see the module docstring.
_BOOKKEEPING = (
    "lock",
    "number",
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "create_future",
    "max_content_size",
    "_Channel__close_event",  # set when a close begins, a few loop turns before is_closed
)


class UnsupportedChannel(RuntimeError):
    """The AMQP client's channel does not keep publishes the way publish_many expects."""


class Message(NamedTuple):
    body: bytes
    properties: Basic.Properties  # message_id must be set and unique within the batch
    routing_key: str | None = None  # None: the batch's routing key


class Channel(Protocol):
    """The part of aiormq's Channel that publish_many uses."""

    lock: asyncio.Lock
    number: int
    delivery_tag: int
    confirmations: Any
    message_id_delivery_tag: dict[str, int]
    write_queue: asyncio.Queue[ChannelFrame]
    max_content_size: int

    def create_future(self) -> asyncio.Future[Any]: ...


def check_channel(channel: object) -> None:
    missing = [name for name in _BOOKKEEPING if not hasattr(channel, name)]
    if missing:
        raise UnsupportedChannel(
            f"the aiormq channel lacks {', '.join(missing)}: this aiormq version is not "
            "supported by broker.pipeline; install the versions in requirements.lock, or "
            "set AMQP_PIPELINE=false to publish and settle through aio-pika's public API"
        )


def _frames(channel: Channel, exchange: str, routing_key: str, message: Message) -> bytes:
    frames: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
        ContentHeader(properties=message.properties, body_size=len(message.body)),
    ]
    body = message.body
    step = channel.max_content_size
    frames += [ContentBody(body[i : i + step]) for i in range(0, len(body), step)]
    return ChannelFrame.marshall(channel_number=channel.number, frames=frames).payload


async def publish_many(
    channel: Channel,
    messages: Sequence[Message],
    *,
    exchange: str,
    routing_key: str,
    within: float,
) -> list[Any]:
    """Publish ``messages`` (``mandatory``, on a channel in confirm mode) and wait up to
    ``within`` seconds for their confirms, in all. Each goes with its own routing key,
    or ``routing_key`` when it has none.

    Returns one entry per message, in order: the ``Basic.Ack``, or the error that
    refuses it: what aiormq sets for a nack or a return, ``TimeoutError`` for a confirm
    that did not come in time, the marshalling error for properties AMQP cannot encode
    (that message is not sent; the others are), or ``CancelledError`` for a confirm
    aiormq gave up on when its channel or connection closed. Raises if the batch could
    not be written within ``within`` seconds (``TimeoutError``) or the channel failed first.
    """
    results: list[Any] = [None] * len(messages)
    confirms: dict[int, tuple[int, asyncio.Future[Any]]] = {}  # position -> tag, confirm
    written: asyncio.Future[Any] | None = None
    try:
        async with asyncio.timeout(within):
            async with channel.lock:
                payloads = []
                for position, message in enumerate(messages):
                    try:
                        payload = _frames(
                            channel, exchange, message.routing_key or routing_key, message
                        )
                    except Exception as exc:  # e.g. an integer header past 64 bits
                        results[position] = exc
                        continue
                    # Registered before anything is written: a return or a confirm can
                    # come back as soon as the broker has the message.
                    channel.delivery_tag += 1
                    tag = channel.delivery_tag
                    confirm = channel.create_future()
                    channel.confirmations[tag] = confirm
                    channel.message_id_delivery_tag[str(message.properties.message_id)] = tag
                    confirms[position] = (tag, confirm)
                    payloads.append(payload)
                if not payloads:
                    return results
                # Waiting for the writer to drain the socket keeps a slow link from
                # buffering batch after batch in memory.
                written = channel.create_future()
                frame = ChannelFrame(
                    payload=b"".join(payloads), should_close=False, drain_future=written
                )
                try:
                    # The connection's queue is bounded: a writer stuck on a full socket
                    # makes this wait, up to the deadline.
                    await channel.write_queue.put(frame)
                except BaseException:
                    # Nothing of the batch is on its way: give its delivery tags back,
                    # as basic_publish does, or the broker's acks would from now on
                    # settle the confirms of other messages.
                    channel.delivery_tag -= len(confirms)
                    for tag, _ in confirms.values():
                        channel.confirmations.pop(tag, None)
                    written.cancel()
                    raise
            await written
        await asyncio.wait([confirm for _, confirm in confirms.values()], timeout=within)
        for position, (_, confirm) in confirms.items():
            if not confirm.done():
                results[position] = TimeoutError()
            elif confirm.cancelled():
                results[position] = asyncio.CancelledError()
            else:
                results[position] = confirm.exception() or confirm.result()
        return results
    finally:
        if written is not None:
            written.cancel()  # done by now, unless the batch failed waiting for the writer
        for position, (tag, confirm) in confirms.items():
            # A late confirm finds its future cancelled and is ignored, as aiormq does
            # for a publish that timed out; the message id is no longer ours to map.
            if confirm.done() and not confirm.cancelled():
                confirm.exception()  # retrieved: no "never retrieved" warning for it
            confirm.cancel()
            message_id = str(messages[position].properties.message_id)
            if channel.message_id_delivery_tag.get(message_id) == tag:
                del channel.message_id_delivery_tag[message_id]


def closing(channel: Any) -> bool:
    """Whether ``channel`` is closed or its close has begun. aiormq's own ``basic_ack``
    refuses both: a frame written after the channel's close-ok reaches a channel the
    broker has dropped, and RabbitMQ closes the whole connection for it."""
    return bool(channel.is_closed or channel._Channel__close_event.is_set())


async def send_frames(channel: Any, frames: Sequence[Any]) -> None:
    """Write ``frames`` (acks, nacks) on ``channel`` as one write, and return once the
    connection's writer has handed them to the socket.

    aiormq writes and drains every ack on its own; the consumer settles a completion
    batch at once, so its acks go out together. Raises what aiormq raises for a channel
    or connection that closed (``ChannelInvalidStateError``, ``ConnectionError``...).
    """
    if closing(channel):
        raise ChannelInvalidStateError(f"{channel!r} closed")
    written = channel.create_future()
    frame = ChannelFrame.marshall(
        channel_number=channel.number, frames=frames, drain_future=written
    )
    try:
        await channel.write_queue.put(frame)
    except BaseException:
        written.cancel()
        raise
    await written
