"""relay/publisher.py OutboxPublisher over a fake aiormq channel whose broker confirms on cue."""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, cast

import aio_pika
import aiormq
import orjson
import pytest
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import frame as pamqp_frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from taskbox.db.outbox import PublishRefusal
from taskbox.relay.publisher import BrokerUnavailable, OutboxPublisher, describe

ROUTING_KEY = "taskbox.tasks"
PUBLISH_TIMEOUT = 0.25  # long enough for a loaded CI box; the timeout cases wait it out


class NeverConfirmed:
    """Marker outcome: the broker never answers, so the publish timeout must fire."""


Outcome = BaseException | NeverConfirmed | None


@dataclass
class Publish:
    body: bytes
    properties: Basic.Properties
    exchange: str
    routing_key: str
    mandatory: bool


@dataclass
class FakeChannel:
    """aiormq's channel as broker.pipeline uses it (its lock, delivery tags, confirm
    futures and the connection's write queue), with a broker behind the queue that reads
    the frames written, as bytes, and settles each confirm by the message's outcome.

    Confirms come only once ``confirm_after`` publishes have arrived, like a broker
    whose confirms arrive after the client has pipelined the whole batch."""

    outcomes: dict[int, Outcome] = field(default_factory=dict)  # outbox id -> outcome
    confirm_after: int = 0
    publishes: list[Publish] = field(default_factory=list)
    in_flight_at_confirm: list[int] = field(default_factory=list)
    writes: int = 0
    number: int = 1
    delivery_tag: int = 0
    max_content_size: int = 131_072 - 8
    confirmations: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    message_id_delivery_tag: dict[str, int] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    write_queue: asyncio.Queue[ChannelFrame] = field(default_factory=asyncio.Queue)
    _all_sent: asyncio.Event = field(default_factory=asyncio.Event)
    _tags_seen: int = 0
    closed: bool = False  # the publisher closed it to get a new one (after a nack)

    def __post_init__(self) -> None:
        self._broker = asyncio.get_running_loop().create_task(self._serve())

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def close(self) -> None:
        self.closed = True

    async def _serve(self) -> None:
        while True:
            written = await self.write_queue.get()
            self.writes += 1
            data = written.payload
            received: list[Any] = []
            while data:
                consumed, channel, frame = pamqp_frame.unmarshal(data)
                assert channel == self.number
                received.append(frame)
                data = data[consumed:]
            written.drain()
            while received:
                publish, header, body = received.pop(0), received.pop(0), received.pop(0)
                assert isinstance(publish, Basic.Publish)
                assert isinstance(header, ContentHeader)
                self.publishes.append(
                    Publish(
                        body.value,
                        header.properties,
                        publish.exchange,
                        publish.routing_key,
                        publish.mandatory,
                    )
                )
            if len(self.publishes) >= self.confirm_after:
                self._all_sent.set()
                self._settle()

    def _settle(self) -> None:
        for publish in self.publishes[self._tags_seen :]:
            self._tags_seen += 1
            tag = self._tags_seen
            self.in_flight_at_confirm.append(len(self.publishes))
            assert self.message_id_delivery_tag[str(publish.properties.message_id)] == tag
            confirm = self.confirmations.pop(tag)
            outcome = self.outcomes.get(int(str(publish.properties.message_id)))
            if isinstance(outcome, NeverConfirmed) or confirm.done():
                continue
            if isinstance(outcome, BaseException):
                confirm.set_exception(outcome)
            else:
                confirm.set_result(Basic.Ack(delivery_tag=tag))


@dataclass
class FakeRobustChannel:
    """aio-pika's channel as the publisher sees it: closed or not, and the aiormq
    channel underneath (which may take its time to come back)."""

    underlay: FakeChannel
    is_closed: bool = False
    reconnected: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.reconnected.set()

    async def get_underlay_channel(self) -> FakeChannel:
        await self.reconnected.wait()
        return self.underlay

    async def get_exchange(self, name: str, *, ensure: bool = True) -> Any:
        raise AssertionError("the pipeline path never asks for aio-pika's exchange")


def outbox_row(
    outbox_id: int,
    *,
    publish_attempts: int = 0,
    priority: int = 0,
    headers: dict[str, Any] | None = None,
    kind: str = "task.created",
) -> dict[str, Any]:
    task_id = uuid.uuid4()
    return {
        "id": outbox_id,
        "task_id": task_id,
        "kind": kind,
        "body": {"task_id": str(task_id), "type": "echo", "priority": priority},
        "headers": headers if headers is not None else {},
        "publish_attempts": publish_attempts,
        "queue": "default",
    }


@dataclass
class RecordingDelay:
    calls: list[int] = field(default_factory=list)

    def __call__(self, attempt: int) -> float:
        self.calls.append(attempt)
        return attempt * 10.0


EXCHANGE = "taskbox"


def make_publisher(
    channel: FakeChannel | FakeRobustChannel, delay: RecordingDelay
) -> OutboxPublisher:
    source = channel if isinstance(channel, FakeRobustChannel) else FakeRobustChannel(channel)
    return OutboxPublisher(
        source, EXCHANGE, ROUTING_KEY, timeout=PUBLISH_TIMEOUT, retry_delay=delay
    )


def nack() -> aiormq.exceptions.DeliveryError:
    # What aiormq raises for a Basic.Nack (aiormq/channel.py, _confirm_delivery).
    return aio_pika.exceptions.DeliveryError(None, Basic.Nack(delivery_tag=2))


def returned() -> aiormq.exceptions.PublishError:
    # What aiormq raises for a Basic.Return on a channel with on_return_raises=True.
    frame = Basic.Return(
        reply_code=312, reply_text="NO_ROUTE", exchange="taskbox", routing_key=ROUTING_KEY
    )
    message = DeliveredMessage(
        delivery=frame, header=ContentHeader(), body=b"{}", channel=cast(Any, None)
    )
    return aio_pika.exceptions.PublishError(message, frame)


async def test_every_row_is_published_when_every_publish_is_confirmed() -> None:
    channel, delay = FakeChannel(), RecordingDelay()
    rows = [outbox_row(i) for i in (3, 1, 2)]
    report = await make_publisher(channel, delay).publish_batch(rows)
    assert report.published == [3, 1, 2]
    assert report.refused == []
    assert delay.calls == []
    assert [p.properties.message_id for p in channel.publishes] == ["3", "1", "2"]


async def test_an_empty_batch_publishes_nothing() -> None:
    channel = FakeChannel()
    report = await make_publisher(channel, RecordingDelay()).publish_batch([])
    assert (report.published, report.refused, channel.publishes) == ([], [], [])


async def test_publishes_are_pipelined_not_one_round_trip_each() -> None:
    rows = [outbox_row(i) for i in range(1, 21)]
    channel = FakeChannel(confirm_after=len(rows))
    # Sequential publishing would wait for the first confirm forever: the fake times
    # the first publish out, so the row is refused and the assertions below fail.
    report = await make_publisher(channel, RecordingDelay()).publish_batch(rows)
    assert report.refused == []
    assert report.published == list(range(1, 21))
    # Every confirm resolved with all twenty publishes already sent.
    assert channel.in_flight_at_confirm == [20] * 20


async def test_publish_arguments() -> None:
    channel = FakeChannel()
    await make_publisher(channel, RecordingDelay()).publish_batch([outbox_row(1)])
    [publish] = channel.publishes
    assert publish.exchange == EXCHANGE
    assert publish.routing_key == ROUTING_KEY
    assert publish.mandatory is True


async def test_a_batch_goes_out_as_one_write_and_leaves_no_bookkeeping_behind() -> None:
    channel = FakeChannel(outcomes={2: NeverConfirmed()})
    report = await make_publisher(channel, RecordingDelay()).publish_batch(
        [outbox_row(i) for i in (1, 2, 3)]
    )
    assert report.published == [1, 3]
    assert channel.writes == 1
    assert channel.delivery_tag == 3
    assert channel.message_id_delivery_tag == {}


async def test_the_message_built_from_a_row() -> None:
    channel = FakeChannel()
    row = outbox_row(
        981,
        priority=7,
        kind="task.retry",
        headers={"traceparent": "00-4bf92f3577b34da6-00f067aa0ba902b7-01", "attempt": 2},
    )
    await make_publisher(channel, RecordingDelay()).publish_batch([row])
    publish = channel.publishes[0]
    message = publish.properties
    assert message.delivery_mode == 2  # persistent
    assert message.message_id == "981"
    assert message.priority == 7
    assert message.message_type == "task.retry"
    assert message.content_type == "application/json"
    assert message.timestamp is not None
    assert message.headers == {
        "traceparent": "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
        "attempt": 2,
    }
    assert orjson.loads(publish.body) == {
        "task_id": str(row["task_id"]),
        "type": "echo",
        "outbox_id": 981,
        "kind": "task.retry",
    }


@pytest.mark.parametrize(
    ("outcome", "error"),
    [
        (
            nack(),
            "DeliveryError: Message delivery failed: Basic.Nack(delivery_tag=2, multiple=False)",
        ),
        (
            returned(),
            "PublishError: Message delivery failed: Basic.Return(reply_code=312, "
            "reply_text='NO_ROUTE', exchange='taskbox', routing_key='taskbox.tasks')",
        ),
        (NeverConfirmed(), "TimeoutError"),
    ],
    ids=["nack", "return", "timeout"],
)
async def test_a_failed_publish_refuses_only_its_row(outcome: Outcome, error: str) -> None:
    channel, delay = FakeChannel(outcomes={12: outcome}), RecordingDelay()
    rows = [
        outbox_row(11, publish_attempts=0),
        outbox_row(12, publish_attempts=4),
        outbox_row(13, publish_attempts=1),
    ]
    report = await make_publisher(channel, delay).publish_batch(rows)
    assert report.published == [11, 13]
    assert report.refused == [PublishRefusal(outbox_id=12, error=error, retry_in=50.0)]
    assert delay.calls == [5]


@pytest.mark.parametrize(
    ("outcome", "renewed"),
    [(nack(), True), (returned(), False), (NeverConfirmed(), False)],
    ids=["nack", "return", "timeout"],
)
async def test_a_nack_costs_the_channel_a_return_or_timeout_does_not(
    outcome: Outcome, renewed: bool
) -> None:
    """RabbitMQ 3.10 keeps nacking on a channel that first published to a quorum queue
    during a leader election (tests/cluster): after a nack the publisher closes the
    aiormq channel, and aio-pika's robust channel opens another."""
    channel = FakeChannel(outcomes={12: outcome})
    report = await make_publisher(channel, RecordingDelay()).publish_batch(
        [outbox_row(11), outbox_row(12)]
    )
    assert report.published == [11]
    assert channel.closed is renewed


async def test_a_channel_nacked_by_two_batches_is_renewed_once() -> None:
    """Concurrent batches nacked on one channel: the second must not close the channel
    the first renewal gave (aio-pika would not restore a channel closed while it was
    restoring it, and the relay would publish nothing until the connection dropped)."""
    old = FakeChannel(outcomes={12: nack()})
    source = FakeRobustChannel(old)
    source.reconnected.set()
    publisher = make_publisher(source, RecordingDelay())
    await publisher._renew_channel(old)
    assert old.closed
    fresh = FakeChannel()
    source.underlay = fresh  # what aio-pika's restore put in its place
    await publisher._renew_channel(old)  # the other batch's nack, on the old channel
    assert not fresh.closed


@pytest.mark.parametrize(
    ("outcome", "error"),
    [
        (
            aio_pika.exceptions.ChannelInvalidStateError("<Channel: 1> closed"),
            "ChannelInvalidStateError: <Channel: 1> closed",
        ),
        (
            aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"),
            "ConnectionClosed: [Errno 320] CONNECTION_FORCED",
        ),
        (ConnectionResetError("Connection lost"), "ConnectionResetError: Connection lost"),
    ],
    ids=["channel-closed", "connection-closed", "connection-reset"],
)
async def test_a_lost_connection_fails_the_whole_batch_without_blaming_rows(
    outcome: Outcome, error: str
) -> None:
    channel, delay = FakeChannel(outcomes={12: outcome, 13: nack()}), RecordingDelay()
    rows = [outbox_row(11), outbox_row(12), outbox_row(13)]
    with pytest.raises(BrokerUnavailable, match=f"^{re.escape(error)}$"):
        await make_publisher(channel, delay).publish_batch(rows)
    assert delay.calls == []


async def test_several_refusals_each_carry_their_own_error_and_backoff() -> None:
    channel = FakeChannel(outcomes={1: nack(), 3: NeverConfirmed(), 4: returned()})
    delay = RecordingDelay()
    rows = [outbox_row(i, publish_attempts=i) for i in range(1, 6)]
    report = await make_publisher(channel, delay).publish_batch(rows)
    assert report.published == [2, 5]
    assert [(r.outbox_id, r.error.split(":")[0], r.retry_in) for r in report.refused] == [
        (1, "DeliveryError", 20.0),
        (3, "TimeoutError", 40.0),
        (4, "PublishError", 50.0),
    ]


async def test_a_publish_cancelled_by_aiormq_closing_the_connection_is_the_broker_away() -> None:
    # aiormq rejects the pending confirms of a connection it closes by force with a
    # CancelledError; the relay was not cancelled, so this is an outage, not a stop.
    channel = FakeChannel(outcomes={2: asyncio.CancelledError()})
    with pytest.raises(BrokerUnavailable, match=r"^CancelledError$"):
        await make_publisher(channel, RecordingDelay()).publish_batch(
            [outbox_row(1), outbox_row(2)]
        )


async def test_cancelling_the_relay_mid_batch_cancels_the_batch() -> None:
    channel = FakeChannel(outcomes={1: NeverConfirmed()}, confirm_after=2)
    publisher = OutboxPublisher(
        FakeRobustChannel(channel),
        EXCHANGE,
        ROUTING_KEY,
        timeout=30.0,
        retry_delay=RecordingDelay(),
    )
    batch = asyncio.create_task(publisher.publish_batch([outbox_row(1), outbox_row(2)]))
    await channel._all_sent.wait()  # both publishes are out; row 1's confirm never comes
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch


def test_describe() -> None:
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(OSError("  \n")) == "OSError"
    assert describe(ValueError(" bad \n")) == "ValueError: bad"


async def test_a_closed_channel_fails_the_batch_before_publishing() -> None:
    channel = FakeRobustChannel(FakeChannel(), is_closed=True)
    with pytest.raises(BrokerUnavailable, match="the AMQP channel is closed"):
        await make_publisher(channel, RecordingDelay()).publish_batch([outbox_row(1)])
    assert channel.underlay.publishes == []


async def test_a_channel_still_reconnecting_fails_the_batch_within_the_timeout() -> None:
    # The relay holds its claim while it publishes: it must not wait on a reconnection
    # for as long as that takes.
    channel = FakeRobustChannel(FakeChannel())
    channel.reconnected.clear()
    with pytest.raises(BrokerUnavailable, match="did not come back in time"):
        await make_publisher(channel, RecordingDelay()).publish_batch([outbox_row(1)])
    assert channel.underlay.publishes == []


async def test_a_batch_without_a_single_confirm_is_an_outage_not_the_rows_fault() -> None:
    # A silent link or a broker alarm: every confirm times out. No row is charged.
    channel = FakeChannel(outcomes={1: NeverConfirmed(), 2: NeverConfirmed()})
    delay = RecordingDelay()
    with pytest.raises(BrokerUnavailable, match=r"no publisher confirm within 0.25s for any of 2"):
        await make_publisher(channel, delay).publish_batch([outbox_row(1), outbox_row(2)])
    assert delay.calls == []


async def test_a_batch_the_writer_cannot_take_gives_its_delivery_tags_back() -> None:
    # The connection's write queue is full (a writer stuck on a socket the broker does
    # not read): nothing of the batch goes out, and the channel's delivery tags must
    # stay in step with the broker's, or its acks would settle other messages' confirms.
    channel = FakeChannel()
    channel._broker.cancel()
    channel.write_queue = asyncio.Queue(maxsize=1)
    channel.write_queue.put_nowait(ChannelFrame(payload=b"", should_close=False))
    with pytest.raises(BrokerUnavailable, match="could not be written to the broker within"):
        await make_publisher(channel, RecordingDelay()).publish_batch(
            [outbox_row(1), outbox_row(2)]
        )
    assert channel.delivery_tag == 0
    assert channel.confirmations == {}
    assert channel.message_id_delivery_tag == {}
