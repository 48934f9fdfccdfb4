"""Publishing a claimed batch with publisher confirms, all in flight at once.

A row counts as published only when the broker confirmed it. A nack, a return
(``mandatory``: no queue bound) or a confirm that never came (a broker alarm blocks
publishers) refuses that row alone: it gets the error and a backoff, so it is retried
later and never blocks the rows behind it.

A lost channel or connection is not the row's fault: the whole batch raises
BrokerUnavailable, the relay rolls its claim back and retries once the robust
connection is back. Rows the broker confirmed before the loss go out again then: a
duplicate, never a loss, and no outage inflates a row's attempts or backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aio_pika
import aiormq

from broker import messages
from db.outbox import PublishRefusal


class BrokerUnavailable(ConnectionError):
    """The channel or connection went away during the batch."""


# Failures that condemn one message. Anything else means the broker is unreachable.
_REFUSALS: tuple[type[BaseException], ...] = (aiormq.exceptions.DeliveryError, TimeoutError)


class Exchange(Protocol):
    async def publish(
        self,
        message: aio_pika.abc.AbstractMessage,
        routing_key: str,
        *,
        mandatory: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 - aio-pika's signature
    ) -> Any: ...


class OutboxRow(Protocol):
    def __getitem__(self, key: str) -> Any: ...


@dataclass(slots=True)
class PublishReport:
    published: list[int] = field(default_factory=list)
    refused: list[PublishRefusal] = field(default_factory=list)


def describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class OutboxPublisher:
    def __init__(
        self,
        exchange: Exchange,
        routing_key: str,
        *,
        timeout: float,
        retry_delay: Callable[[int], float],
    ) -> None:
        self._exchange = exchange
        self._routing_key = routing_key
        self._timeout = timeout
        self._retry_delay = retry_delay  # attempt number -> seconds

    async def _publish(self, row: OutboxRow) -> None:
        message = messages.build(
            outbox_id=row["id"], kind=row["kind"], body=row["body"], headers=row["headers"]
        )
        await self._exchange.publish(
            message, self._routing_key, mandatory=True, timeout=self._timeout
        )

    async def publish_batch(self, rows: Sequence[OutboxRow]) -> PublishReport:
        results = await asyncio.gather(*(self._publish(r) for r in rows), return_exceptions=True)
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException) and not isinstance(result, _REFUSALS):
                raise BrokerUnavailable(describe(result)) from result
        report = PublishReport()
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                attempt = row["publish_attempts"] + 1
                report.refused.append(
                    PublishRefusal(row["id"], describe(result), self._retry_delay(attempt))
                )
            else:
                report.published.append(row["id"])
        return report
