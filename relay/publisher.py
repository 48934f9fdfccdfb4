"""Publishing a claimed batch with publisher confirms, all in flight at once.

The batch goes out as one write on aiormq's channel (broker.pipeline) and its confirms
are awaited together, under one deadline (RELAY_PUBLISH_TIMEOUT). With
AMQP_PIPELINE=false each message goes through aio-pika's public ``Exchange.publish``
instead (broker.public), all of the batch in flight at once; the results read the same.

A row counts as published only when the broker confirmed it. A nack, a return
(``mandatory``: no queue bound), a confirm that never came while others did, or headers
AMQP cannot encode refuse that row alone: it gets the error and a backoff, so it is
retried later and never blocks the rows behind it. A batch in which no confirm came at
all (a silent link, a broker alarm blocking publishers) is an outage, like a lost
channel below.

A lost channel or connection is not the row's fault: the whole batch raises
BrokerUnavailable, the relay rolls its claim back and retries once the robust
connection is back. Rows the broker confirmed before the loss go out again then: a
duplicate, never a loss, and no outage inflates a row's attempts or backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiormq
from pamqp.commands import Basic

from taskbox.broker import messages, pipeline, public
from taskbox.broker.topology import TopologyMismatch
from taskbox.db.outbox import PublishRefusal
from taskbox.runtime.lifecycle import being_cancelled
from taskbox.runtime.queues import amqp_queue_name


class BrokerUnavailable(ConnectionError):
    """The channel or connection went away during the batch."""


# Failures that condemn one message. Anything else means the broker is unreachable.
# pamqp raises TypeError, OverflowError or struct.error for a header value AMQP cannot
# carry (an integer past 64 bits, a float past 32): such a row could never go out, and
# failing its whole batch for it would stall the relay on it forever. broker.pipeline
# marshals every message before it writes the batch and leaves such a one out, so the
# channel is unharmed.
_REFUSALS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.DeliveryError,
    TimeoutError,
    TypeError,
    OverflowError,
    struct.error,
)


def _nacked(result: object) -> bool:
    """The broker answered basic.nack (not a return: that is the routing's doing)."""
    return isinstance(result, aiormq.exceptions.DeliveryError) and isinstance(
        result.frame, Basic.Nack
    )


class ChannelSource(Protocol):
    """aio-pika's (robust) channel, which hands out the aiormq channel of the moment:
    a new one after every reconnection."""

    @property
    def is_closed(self) -> bool: ...

    async def get_underlay_channel(self) -> Any: ...

    async def get_exchange(self, name: str, *, ensure: bool = True) -> Any: ...


class OutboxRow(Protocol):
    def __getitem__(self, key: str) -> Any: ...


class QueueDeclarer(Protocol):
    """broker.topology.QueueDeclarer: declares a Taskbox queue's AMQP queue on first use."""

    def declared(self, queue: str) -> bool: ...

    def forget(self, queue: str) -> None: ...

    async def ensure(self, queue: str) -> None: ...


@dataclass(slots=True)
class PublishReport:
    published: list[int] = field(default_factory=list)
    refused: list[PublishRefusal] = field(default_factory=list)


def describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def broker_errors(timed_out: str) -> Iterator[None]:
    """Any failure of a publish or a declaration that is not the rows' own (those are
    results or caught inside) is the broker being away: BrokerUnavailable, with
    ``timed_out`` for a deadline that passed. A cancellation nobody asked for is aiormq
    giving up on its connection; one asked for goes through."""
    try:
        yield
    except BrokerUnavailable:
        raise
    except asyncio.CancelledError as exc:
        if being_cancelled():
            raise
        raise BrokerUnavailable(describe(exc)) from exc
    except TimeoutError:
        raise BrokerUnavailable(timed_out) from None
    except Exception as exc:  # the channel or connection failed
        raise BrokerUnavailable(describe(exc)) from exc


class OutboxPublisher:
    def __init__(
        self,
        channel: ChannelSource,
        exchange: str,
        routing_key: str,
        *,
        timeout: float,
        retry_delay: Callable[[int], float],
        pipelined: bool = True,
        declarer: QueueDeclarer | None = None,
    ) -> None:
        self._channel = channel
        # Each row goes to its task's queue: QUEUE_NAME (``routing_key``) for the
        # default queue, <QUEUE_NAME>.<queue> for another, declared on its first use.
        self._declarer = declarer
        self._routing_keys: dict[str, str] = {}
        self._pipelined = pipelined
        self.exchange = exchange
        self._routing_key = routing_key
        self._timeout = timeout
        self._retry_delay = retry_delay  # attempt number -> seconds
        self._renewing = asyncio.Lock()  # one channel renewal or restore at a time

    async def _underlay(self) -> pipeline.Channel:
        # A robust channel waits for its reconnection here; the relay holds a claim
        # meanwhile, so a closed channel fails the batch at once instead (the relay backs
        # off and the robust connection comes back on its own).
        if self._channel.is_closed:
            await self._restore_if_dead()
            if self._channel.is_closed:
                raise BrokerUnavailable("the AMQP channel is closed")
        try:
            async with asyncio.timeout(self._timeout):
                channel: pipeline.Channel = await self._channel.get_underlay_channel()
        except TimeoutError:
            raise BrokerUnavailable("the AMQP channel did not come back in time") from None
        return channel

    async def _publish(self, batch: list[pipeline.Message]) -> list[Any]:
        if not self._pipelined:
            # The channel's wait for a reconnection is bounded here, as for the pipeline;
            # the whole batch then within the pipeline's bound (a write, then confirms).
            await self._underlay()
            async with asyncio.timeout(2 * self._timeout):
                return await public.publish_each(
                    self._channel,
                    batch,
                    exchange=self.exchange,
                    routing_key=self._routing_key,
                    within=self._timeout,
                )
        channel = await self._underlay()
        return await pipeline.publish_many(
            channel,
            batch,
            exchange=self.exchange,
            routing_key=self._routing_key,
            within=self._timeout,
        )

    async def _renew_channel(self, nacked_on: Any) -> None:
        """Replace the publishing channel ``nacked_on`` with a new one on the same
        connection.

        A nack is RabbitMQ saying its queue could not take the message. On 3.10, a
        channel that first published to a quorum queue while its leader was being
        elected (a client that moved to another node as the old leader died) nacks
        every later publish to it, long after a new leader took over (20-30 s and on
        in our runs), while a new channel publishes at once (tests/cluster). So a nack
        costs the channel: closing the aiormq channel under the robust one makes
        aio-pika open another and restore its declarations, as after a channel error.

        One renewal at a time, and only of the channel that nacked: with concurrent
        batches, a second batch's nack on the same channel (or on the new one, before
        aio-pika finished restoring it) must not close a channel mid-restore, which
        aio-pika would then never restore. Each renewal waits, bounded, for the restore
        to finish. Nacks are rare otherwise; the rows themselves back off as refused."""
        async with self._renewing:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    current = await self._channel.get_underlay_channel()
                    if current is not nacked_on or getattr(current, "is_closed", False):
                        return  # renewed already, or gone with its connection
                    await current.close()
                    ready = getattr(self._channel, "ready", None)  # a robust channel's
                    if ready is not None:
                        await ready()

    async def _restore_if_dead(self) -> None:
        """A robust channel closed while its connection is up is restored only when the
        connection drops; a restore that failed (say, a declaration the broker refused
        once) would leave the relay publishing nothing until then. aio-pika's own
        restore does nothing while the connection is down or a restore is under way."""
        restore = getattr(self._channel, "restore", None)
        if restore is None:
            return
        with contextlib.suppress(Exception):
            async with self._renewing, asyncio.timeout(self._timeout):
                await restore()

    def _routing_key_of(self, queue: str) -> str:
        key = self._routing_keys.get(queue)
        if key is None:
            key = self._routing_keys[queue] = amqp_queue_name(self._routing_key, queue)
        return key

    async def _declare_queues(self, queues: set[str]) -> dict[str, str]:
        """Declare the queues of a batch this process has not declared yet; returns the
        ones RabbitMQ refused, with why (their rows are refused, the others go out)."""
        refused: dict[str, str] = {}
        if self._declarer is None:
            return refused
        for queue in sorted(queues):
            if self._declarer.declared(queue):
                continue
            with broker_errors(f"queue {queue!r} could not be declared within {self._timeout:g}s"):
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._declarer.ensure(queue)
                except (TopologyMismatch, aiormq.exceptions.ChannelClosed) as exc:
                    # The broker refused this queue (a mismatch, access refused for the
                    # relay's user, a name it rejects): its rows back off, the rest go out.
                    refused[queue] = describe(exc)
        return refused

    async def publish_batch(self, rows: Sequence[OutboxRow]) -> PublishReport:
        if not rows:
            return PublishReport()
        queues = {r["queue"] for r in rows}
        undeclared = await self._declare_queues(queues)
        if undeclared:
            report = PublishReport()
            for r in rows:
                if r["queue"] in undeclared:
                    attempt = r["publish_attempts"] + 1
                    report.refused.append(
                        PublishRefusal(r["id"], undeclared[r["queue"]], self._retry_delay(attempt))
                    )
            sendable = [r for r in rows if r["queue"] not in undeclared]
            if sendable:
                sent = await self._publish_rows(sendable)
                report.published += sent.published
                report.refused += sent.refused
            return report
        return await self._publish_rows(rows)

    async def _publish_rows(self, rows: Sequence[OutboxRow]) -> PublishReport:
        batch = [
            pipeline.Message(
                *messages.encode(
                    outbox_id=r["id"], kind=r["kind"], body=r["body"], headers=r["headers"]
                ),
                routing_key=self._routing_key_of(r["queue"]),
            )
            for r in rows
        ]
        with broker_errors(
            f"the batch could not be written to the broker within {self._timeout:g}s"
        ):
            used = await self._underlay()  # the channel this batch goes out on
            results = await self._publish(batch)
        for result in results:
            if isinstance(result, asyncio.CancelledError) and being_cancelled():
                raise result
            # A CancelledError nobody asked for is aiormq closing a connection it gave up
            # on (it rejects the pending confirms with one): the broker is away.
            if isinstance(result, BaseException) and not isinstance(result, _REFUSALS):
                raise BrokerUnavailable(describe(result)) from result
        if all(isinstance(result, TimeoutError) for result in results):
            # Not one confirm came back: a link that drops packets without a reset, or a
            # broker that blocks publishers (a memory or disk alarm). That is the broker
            # being away, not these rows' fault: charging each an attempt and a backoff
            # would punish every row an outage happened to meet.
            raise BrokerUnavailable(
                f"no publisher confirm within {self._timeout:g}s for any of {len(rows)} messages"
            )
        if any(_nacked(result) for result in results):
            await self._renew_channel(used)
        report = PublishReport()
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, Basic.Ack):
                report.published.append(row["id"])
                continue
            # Only the broker's ack counts: anything else (a channel that stopped
            # confirming would answer None) leaves the row to be sent again.
            error = (
                result
                if isinstance(result, BaseException)
                else RuntimeError(f"no publisher confirm (got {result!r})")
            )
            attempt = row["publish_attempts"] + 1
            report.refused.append(
                PublishRefusal(row["id"], describe(error), self._retry_delay(attempt))
            )
            if self._declarer is not None:
                # Returned unroutable, say, because its queue was deleted: declare it
                # again before the retry rather than trust this process's memory.
                self._declarer.forget(row["queue"])
        return report
