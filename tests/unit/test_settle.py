"""consumer/worker.py _settle and _settle_all: settling messages, on channels that went away too."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import aiormq
import pytest
from aiormq.abc import ChannelFrame
from pamqp import frame as pamqp_frame
from pamqp.commands import Basic

from taskbox.consumer.worker import _settle, _settle_all, consume


class WrittenChannel:
    """aiormq's channel as _settle_all writes on it: what reaches its write queue is
    read back as frames, and each write is drained (or the channel is closed)."""

    def __init__(
        self,
        number: int,
        closed: bool = False,
        closing: bool = False,
        error: BaseException | None = None,
    ) -> None:
        self.number = number
        self.is_closed = closed
        self.error = error  # what the write's drain future is rejected with, as aiormq does
        # aiormq's Channel.__close_event: set as soon as a close begins.
        self._Channel__close_event = asyncio.Event()
        if closing:
            self._Channel__close_event.set()
        self.write_queue: asyncio.Queue[ChannelFrame] = asyncio.Queue()
        self.writes: list[list[Any]] = []

    def create_future(self) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        if self.error is not None:
            future.set_exception(self.error)
        return future

    def take_writes(self) -> list[list[Any]]:
        while not self.write_queue.empty():
            written = self.write_queue.get_nowait()
            data, frames = written.payload, []
            while data:
                consumed, channel, frame = pamqp_frame.unmarshal(data)
                assert channel == self.number
                frames.append(frame)
                data = data[consumed:]
            self.writes.append(frames)
            written.drain()
        return self.writes


class DeliveredMessage:
    def __init__(self, channel: WrittenChannel, tag: int) -> None:
        self._channel = channel
        self.delivery_tag = tag

    @property
    def channel(self) -> WrittenChannel:
        # aio-pika's IncomingMessage.channel raises this for a closed channel.
        if self._channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{self._channel!r} closed")
        return self._channel


async def test_a_committed_batch_is_settled_with_one_write_per_channel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="taskbox.consumer.worker")
    first, second, gone = WrittenChannel(1), WrittenChannel(2), WrittenChannel(3, closed=True)
    # Its close has begun (the broker's channel.close arrived), is_closed not yet true:
    # an ack written now would follow the close-ok and cost the whole connection.
    going = WrittenChannel(4, closing=True)
    settlements = [
        (DeliveredMessage(first, 7), "ack"),
        (DeliveredMessage(second, 3), "ack"),
        (DeliveredMessage(first, 8), "requeue"),
        (DeliveredMessage(gone, 1), "ack"),
        (DeliveredMessage(going, 5), "ack"),
        (DeliveredMessage(first, 9), "ack"),
    ]
    settling = asyncio.create_task(_settle_all(cast(Any, settlements)))
    while not settling.done():
        await asyncio.sleep(0)
        first.take_writes()
        second.take_writes()
    await settling
    [[ack7, nack8, ack9]] = first.writes
    assert (type(ack7), ack7.delivery_tag, ack7.multiple) == (Basic.Ack, 7, False)
    assert (type(nack8), nack8.delivery_tag, nack8.requeue) == (Basic.Nack, 8, True)
    assert (type(ack9), ack9.delivery_tag) == (Basic.Ack, 9)
    [[ack3]] = second.writes
    assert (type(ack3), ack3.delivery_tag) == (Basic.Ack, 3)
    assert gone.write_queue.empty()
    assert going.write_queue.empty()
    assert "channel gone; it will be redelivered" in caplog.text
    assert "could not settle 1 messages (channel gone; it will be redelivered)" in caplog.text


@pytest.mark.parametrize(
    "error",
    [
        aiormq.exceptions.ChannelInvalidStateError("<Channel: 1> closed"),
        aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"),
        ConnectionResetError("Connection lost"),
        # aiormq rejects the pending writes of a connection it closes by force with this.
        asyncio.CancelledError(),
    ],
    ids=["channel-closed", "connection-closed", "reset", "closed-by-force"],
)
@pytest.mark.parametrize("how", ["ack", "requeue", "dead-letter"])
async def test_a_channel_lost_during_the_write_is_logged_not_raised(
    error: BaseException, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskbox.consumer.worker")
    channel = WrittenChannel(1, error=error)
    await _settle(cast(Any, DeliveredMessage(channel, 4)), how)
    assert "it will be redelivered" in caplog.text


@pytest.mark.parametrize(
    ("how", "frame", "requeue"),
    [("ack", Basic.Ack, None), ("requeue", Basic.Nack, True), ("dead-letter", Basic.Reject, False)],
)
async def test_each_settlement_is_its_frame(how: str, frame: type, requeue: bool | None) -> None:
    channel = WrittenChannel(1)
    settling = asyncio.create_task(_settle(cast(Any, DeliveredMessage(channel, 4)), how))
    while not settling.done():
        await asyncio.sleep(0)
        channel.take_writes()
    await settling
    [[written]] = channel.writes
    assert (type(written), written.delivery_tag) == (frame, 4)
    if requeue is not None:
        assert written.requeue is requeue


async def test_cancelling_the_settling_task_still_cancels_it() -> None:
    channel = WrittenChannel(1)  # nobody drains its writes
    settling = asyncio.create_task(_settle(cast(Any, DeliveredMessage(channel, 4)), "ack"))
    await channel.write_queue.get()  # written, and never drained
    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling


class CutQueue:
    """A queue whose basic.consume meets a connection cut ``cuts`` times first."""

    name = "tasks"

    def __init__(self, cuts: int) -> None:
        self.cuts = cuts
        self.calls = 0

    async def consume(self, callback: Any) -> str:
        self.calls += 1
        if self.calls <= self.cuts:
            raise aiormq.exceptions.AMQPConnectionError("Server connection reset")
        return "ctag-1"


async def test_consume_is_tried_again_while_the_connection_is_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = CutQueue(cuts=2)
    async with asyncio.timeout(5):
        tag = await consume(cast(Any, queue), lambda message: None)
    assert (tag, queue.calls) == ("ctag-1", 3)
    assert sum("consuming from tasks failed" in r.message for r in caplog.records) == 2
