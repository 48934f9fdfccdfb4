"""The dead-letter watch: no task waits for a message the broker dropped.

RabbitMQ dead-letters a task message the consumer never settled for good: a quorum
queue does so after ``QUEUE_DELIVERY_LIMIT`` deliveries (a message handed back at many
shutdowns, or returned by many consumers that died holding it), and a TTL or length
policy an operator sets does so too. Such a message may have been its task's only way
forward: the task stays PENDING, with its outbox row published, and nothing would ever
run it.

Every dead letter reaches two queues (the dead-letter exchange is a fanout): the
operators' ``DEAD_LETTER_QUEUE``, and its ``.watch`` copy, which every consumer reads.
For each task message there, the database decides (``db.execution.requeue_dead_lettered``):
a PENDING task whose newest outbox row the message was for goes back to NEW with a new
outbox row, and the relay sends it again; any other task needs nothing. The watch acks
the message only after that decision is committed, so a consumer that dies meanwhile
leaves it to another. Messages that name no task, or are not task messages, are acked
here and stay in the operators' queue.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from taskbox.broker import messages
from taskbox.consumer.metrics import ConsumerMetrics
from taskbox.consumer.worker import consume
from taskbox.db import execution as task_execution
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.execution import Delivery
from taskbox.db.outbox import notify
from taskbox.runtime.backoff import backoff_delay
from taskbox.runtime.logs import task_fields

log = logging.getLogger(__name__)

_KEPT_BACKOFF = 5.0  # seconds before a dead letter the watch could not decide goes back


def death_reason(message: AbstractIncomingMessage) -> str:
    """Why RabbitMQ dead-lettered the message (x-death's newest entry): rejected,
    expired, maxlen or delivery_limit."""
    deaths: Any = (message.headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        reason = deaths[0].get("reason")
        if isinstance(reason, bytes):
            return reason.decode(errors="replace")
        if isinstance(reason, str):
            return reason
    return "unknown"


class DeadLetterWatch:
    def __init__(self, pool: asyncpg.Pool, metrics: ConsumerMetrics, outbox_channel: str) -> None:
        self._pool = pool
        self._metrics = metrics
        self._outbox_channel = outbox_channel

    async def run(self, queue: AbstractQueue) -> None:
        """Consume the watch queue until cancelled."""
        await consume(queue, self.on_dead_letter)
        await asyncio.Event().wait()  # the callbacks do the work

    async def on_dead_letter(self, message: AbstractIncomingMessage) -> None:
        reason = death_reason(message)
        try:
            parsed = messages.parse(message.body)
        except messages.MalformedMessage:
            self._metrics.dead_letters.labels("not_a_task").inc()
            await message.ack()
            return
        fields = task_fields(task_id=str(parsed.task_id), outbox_id=parsed.outbox_id)
        try:
            decision = await self._decide(Delivery(parsed.task_id, parsed.outbox_id))
        except Exception:
            # Not the database being away (that is retried): a refusal such as a revoked
            # grant. The message goes back to the watch queue, to be decided later (here
            # or by another consumer) rather than dropped with its task.
            log.exception("dead-letter watch could not decide; the message is kept", extra=fields)
            self._metrics.dead_letters.labels("error").inc()
            await asyncio.sleep(_KEPT_BACKOFF)
            await message.nack(requeue=True)
            return
        if decision.outbox_id is not None:
            log.warning(
                "the broker dead-lettered the task's message (%s): sent again through "
                "outbox row %d",
                reason,
                decision.outbox_id,
                extra=fields,
            )
            self._metrics.dead_letters.labels("requeued").inc()
            await notify(self._pool, self._outbox_channel)
        else:
            log.info(
                "dead-lettered message (%s) needs nothing: its task is %s",
                reason,
                decision.status or "gone",
                extra=fields,
            )
            self._metrics.dead_letters.labels("not_needed").inc()
        await message.ack()

    async def _decide(self, delivery: Delivery) -> task_execution.DeadLetterDecision:
        failures = 0
        while True:
            try:
                return await task_execution.requeue_dead_lettered(self._pool, delivery)
            except TRANSIENT_DB_ERRORS as exc:
                failures += 1
                delay = backoff_delay(failures, 0.2, 5.0)
                log.warning("dead-letter watch: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
