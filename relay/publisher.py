"""Publishing a claimed batch with publisher confirms, all in flight at once.

A row counts as published only when the broker confirmed it. A nack, a return
(``mandatory``: no queue bound), a timeout or a lost channel make it a refusal, with
the error and a backoff, so it is retried later and never blocks the rows behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aio_pika

from broker import messages
from db.outbox import PublishRefusal


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
        report = PublishReport()
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                attempt = row["publish_attempts"] + 1
                report.refused.append(
                    PublishRefusal(row["id"], describe(result), self._retry_delay(attempt))
                )
            else:
                report.published.append(row["id"])
        return report
