"""broker.pipeline.publish_many, and its fallback through aio-pika's public API
(broker.public.publish_each, AMQP_PIPELINE=false), against the real RabbitMQ: what each
message's entry says is what the broker did with it. Every test runs on both paths.

Every test declares its own exchange and queue (named by broker_settings) and the
fixture deletes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest
from pamqp.commands import Basic

from taskbox.broker import pipeline, public
from taskbox.broker.settings import BrokerSettings
from tests.conftest import AMQP_URL


def message(n: int, body: bytes | None = None, **headers: Any) -> pipeline.Message:
    return pipeline.Message(
        body if body is not None else f'{{"n": {n}}}'.encode(),
        Basic.Properties(delivery_mode=2, message_id=str(n), headers=headers or None),
    )


class Broker:
    def __init__(
        self, channel: aio_pika.abc.AbstractChannel, names: BrokerSettings, path: str
    ) -> None:
        self.channel = channel
        self.path = path  # "pipeline" or "public"
        self.exchange = names.exchange_name
        self.queue = names.queue_name

    async def underlay(self) -> Any:
        return await self.channel.get_underlay_channel()

    async def publish(
        self, messages: list[pipeline.Message], routing_key: str | None = None, within: float = 5
    ) -> list[Any]:
        publish = pipeline.publish_many if self.path == "pipeline" else public.publish_each
        channel: Any = await self.underlay() if self.path == "pipeline" else self.channel
        return await publish(
            channel,
            messages,
            exchange=self.exchange,
            routing_key=self.queue if routing_key is None else routing_key,
            within=within,
        )

    async def drain(self, expected: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
        queue = await self.channel.get_queue(self.queue, ensure=False)
        received = []
        for _ in range(expected):
            incoming = await queue.get(timeout=5, fail=True)
            assert incoming is not None
            await incoming.ack()
            received.append(incoming)
        assert await queue.get(fail=False) is None
        return received


@pytest.fixture(params=["pipeline", "public"])
async def broker(
    request: pytest.FixtureRequest, broker_settings: BrokerSettings
) -> AsyncIterator[Broker]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(broker_settings.exchange_name, "direct")
        queue = await channel.declare_queue(
            broker_settings.queue_name,
            # Five messages at most, refusing (nacking) the publishes beyond.
            arguments={"x-max-length": 5, "x-overflow": "reject-publish"},
        )
        await queue.bind(exchange, routing_key=broker_settings.queue_name)
        pipeline.check_channel(await channel.get_underlay_channel())
        yield Broker(channel, broker_settings, request.param)


async def test_every_message_is_confirmed_and_arrives_in_order_with_its_properties(
    broker: Broker,
) -> None:
    big = bytes(range(256)) * 2_000  # 512,000 bytes: several body frames
    batch = [message(1, traceparent="00-ab-cd-01"), message(2, big), message(3)]
    results = await broker.publish(batch)
    assert [type(r) for r in results] == [Basic.Ack] * 3
    received = await broker.drain(3)
    assert [m.message_id for m in received] == ["1", "2", "3"]
    assert [m.body for m in received] == [b'{"n": 1}', big, b'{"n": 3}']
    assert received[0].headers == {"traceparent": "00-ab-cd-01"}
    assert {m.delivery_mode for m in received} == {aio_pika.DeliveryMode.PERSISTENT}


async def test_a_nacked_publish_is_a_delivery_error_for_that_message_alone(
    broker: Broker,
) -> None:
    results = await broker.publish([message(n) for n in range(1, 8)])
    assert [type(r) for r in results[:5]] == [Basic.Ack] * 5
    for refused in results[5:]:  # the queue holds five and rejects what comes beyond
        assert isinstance(refused, aiormq.exceptions.DeliveryError)
        assert isinstance(refused.frame, Basic.Nack)
    assert len(await broker.drain(5)) == 5


async def test_an_unroutable_message_is_returned_as_a_publish_error(broker: Broker) -> None:
    results = await broker.publish([message(1), message(2)], routing_key="no.such.queue")
    assert all(isinstance(r, aiormq.exceptions.PublishError) for r in results), results
    underlay = await broker.underlay()
    assert underlay.message_id_delivery_tag == {}  # nothing of the batch left behind


async def test_a_message_amqp_cannot_encode_is_refused_and_the_others_go_out(
    broker: Broker,
) -> None:
    results = await broker.publish([message(1), message(2, big=2**70), message(3)])
    assert isinstance(results[0], Basic.Ack) and isinstance(results[2], Basic.Ack)
    assert isinstance(results[1], Exception) and not isinstance(results[1], Basic.Ack)
    assert [m.message_id for m in await broker.drain(2)] == ["1", "3"]


async def test_a_closed_channel_fails_the_batch_and_leaves_no_confirm_waiting(
    broker: Broker,
) -> None:
    underlay = await broker.underlay()
    await underlay.close()
    # aiormq refuses a future on a closed channel at once: the batch fails, nothing waits
    # (through the public API each publish fails alike; the relay reads an error that
    # is not a refusal as the broker going away).
    if broker.path == "pipeline":
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            await asyncio.wait_for(broker.publish([message(1)], within=5), timeout=10)
    else:
        results = await asyncio.wait_for(broker.publish([message(1)], within=5), timeout=10)
        assert [type(r) for r in results] == [aiormq.exceptions.ChannelInvalidStateError]
