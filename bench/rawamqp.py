"""Baselines on bare aio-pika, run as their own process like the code they are compared to.

    python -m bench.rawamqp publish --count N --queue Q   persistent + confirms, pipelined
    python -m bench.rawamqp consume --count N --queue Q   consume + ack each message
    python -m bench.rawamqp latency --rate R --seconds S --queue Q   publish -> deliver

Each prints one JSON line with its figures. They run on uvloop, like the relay and the
consumer, so that a ratio compares the work done, not the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import aio_pika
import orjson
import uvloop

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
WINDOW = 500  # publishes in flight, the relay's default batch size


def _body(i: int) -> bytes:
    # the size of a relay message: a task id, a type, an outbox id and a kind
    return orjson.dumps(
        {
            "task_id": "0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11",
            "type": "echo",
            "outbox_id": i,
            "kind": "task.created",
        }
    )


async def publish(count: int, queue_name: str, max_priority: int = 0) -> dict[str, float]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        # max_priority: the same x-max-priority as Taskbox's task queue, whose broker-side
        # bookkeeping costs something of its own.
        arguments: dict[str, Any] | None = (
            {"x-max-priority": max_priority} if max_priority else None
        )
        await channel.declare_queue(queue_name, durable=True, arguments=arguments)
        exchange = channel.default_exchange
        start = time.perf_counter()
        for first in range(0, count, WINDOW):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            _body(i),
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=str(i),
                        ),
                        queue_name,
                    )
                    for i in range(first, min(first + WINDOW, count))
                )
            )
        elapsed = time.perf_counter() - start
    return {"messages": count, "seconds": elapsed, "per_second": count / elapsed}


async def consume(count: int, queue_name: str, prefetch: int) -> dict[str, float]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, durable=True)
        done = asyncio.Event()
        seen = 0
        first = 0.0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen, first
            if seen == 0:
                first = time.perf_counter()
            await message.ack()
            seen += 1
            if seen >= count:
                done.set()

        await queue.consume(on_message)
        await done.wait()
        elapsed = time.perf_counter() - first
    return {"messages": count, "seconds": elapsed, "per_second": count / elapsed}


async def latency(rate: float, seconds: float, queue_name: str) -> dict[str, float]:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        publish_channel = await connection.channel(publisher_confirms=True)
        consume_channel = await connection.channel()
        queue = await consume_channel.declare_queue(queue_name, durable=True)
        total = int(rate * seconds)
        delays: list[float] = []
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            sent = float(message.body)
            delays.append((time.time() - sent) * 1000)
            await message.ack()
            if len(delays) >= total:
                done.set()

        await queue.consume(on_message)
        start = time.perf_counter()
        pending: set[asyncio.Task[object]] = set()
        for i in range(total):
            # open loop: each message leaves at its scheduled time, whatever came before
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            message = aio_pika.Message(
                repr(time.time()).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            task = asyncio.create_task(
                publish_channel.default_exchange.publish(message, queue_name)
            )
            pending.add(task)
            task.add_done_callback(pending.discard)
        await done.wait()
    delays.sort()
    return {
        "messages": total,
        "p50_ms": delays[len(delays) // 2],
        "p99_ms": delays[min(len(delays) - 1, int(len(delays) * 0.99))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rawamqp")
    parser.add_argument("mode", choices=["publish", "consume", "latency"])
    parser.add_argument("--queue", required=True)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--prefetch", type=int, default=200)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-priority", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "publish":
        result = uvloop.run(publish(args.count, args.queue, args.max_priority))
    elif args.mode == "consume":
        result = uvloop.run(consume(args.count, args.queue, args.prefetch))
    else:
        result = uvloop.run(latency(args.rate, args.seconds, args.queue))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
