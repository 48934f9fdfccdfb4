"""The drain loop: claim a batch, publish it with confirms, record the outcome, commit.

The claim holds the rows' locks (FOR UPDATE SKIP LOCKED) for the whole transaction, so
several relays drain one outbox without publishing a row twice. A crash before the
commit rolls the claim back and the rows are published again later: a duplicate,
never a loss.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter

import aio_pika
import asyncpg
from aio_pika.abc import AbstractRobustConnection
from opentelemetry.trace import Tracer

from taskbox.broker import connection as broker_connection
from taskbox.broker import pipeline, topology
from taskbox.db import outbox
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.relay.metrics import RelayMetrics
from taskbox.relay.publish_spans import record_publish_spans
from taskbox.relay.publisher import BrokerUnavailable, OutboxPublisher, PublishReport
from taskbox.relay.settings import RelaySettings
from taskbox.runtime.backoff import backoff_delay
from taskbox.runtime.lifecycle import wait_first

log = logging.getLogger(__name__)

# Failures that mean "a server is away for now": back off and try again.
TRANSIENT: tuple[type[BaseException], ...] = (
    *TRANSIENT_DB_ERRORS,
    aio_pika.exceptions.AMQPError,
    BrokerUnavailable,
)


async def open_broker(settings: RelaySettings) -> tuple[AbstractRobustConnection, OutboxPublisher]:
    connection = await broker_connection.connect_robust(
        settings.amqp_urls, client_properties={"connection_name": "taskbox-relay"}
    )
    try:
        settings = await topology.fit_existing_queue(connection, settings)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        declared = await topology.declare(channel, settings)
        if settings.amqp_pipeline:
            # Publishing goes under aio-pika, to aiormq's channel (broker.pipeline).
            pipeline.check_channel(await channel.get_underlay_channel())
        else:
            log.info("publishing through aio-pika's public API (AMQP_PIPELINE=false)")
    except BaseException:
        # A retry opens a connection of its own; this one must not linger, reconnecting.
        await connection.close()
        raise
    publisher = OutboxPublisher(
        channel,
        declared.exchange.name,
        declared.routing_key,
        declarer=topology.QueueDeclarer(connection, settings, declared.exchange.name),
        pipelined=settings.amqp_pipeline,
        timeout=settings.relay_publish_timeout,
        retry_delay=functools.partial(
            backoff_delay, base=settings.relay_retry_base_delay, cap=settings.relay_retry_max_delay
        ),
    )
    return connection, publisher


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: OutboxPublisher,
        settings: RelaySettings,
        wake: asyncio.Event,
        metrics: RelayMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._pool = pool
        self._tracer = tracer  # None: tracing is off
        self._publisher = publisher
        self._settings = settings
        self._wake = wake
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.published_total = 0
        self.refused_total = 0
        # When the next row not yet due falls due: (time.monotonic() of the claim that
        # saw it, seconds from that claim), or None.
        self._next_due: tuple[float, float] | None = None
        # time.monotonic() of the drain loop's last sign of life, for /healthz
        self.alive_at = time.monotonic()
        # Rows of a resumed queue unparked at a time: a few batches' worth, each chunk
        # its own short transaction.
        self._unpark_chunk = 4 * settings.relay_batch_size
        self._resumed: list[str] = []  # the last claim's answer: queues to unpark

    async def drain_batch(self, *, first: bool = True) -> int:
        """Claim, publish and record one batch; returns how many rows it claimed
        (rows of finished tasks, closed unsent, and rows of paused queues, parked,
        included)."""
        async with self._pool.acquire() as conn, conn.transaction():
            claim = await outbox.claim_batch(conn, self._settings.relay_batch_size, resumed=first)
            if first:
                self._resumed = claim.resumed
            rows = claim.rows
            due_in = claim.next_due_in
            self._next_due = None if due_in is None else (time.monotonic(), due_in)
            if claim.parked:
                log.info("parked %d rows of paused queues until they resume", claim.parked)
            if not rows:
                return claim.claimed
            started = time.perf_counter()
            started_ns = time.time_ns()
            report: PublishReport = await self._publisher.publish_batch(rows)
            self.metrics.publish_seconds.observe(time.perf_counter() - started)
            if self._tracer is not None:
                record_publish_spans(
                    self._tracer,
                    rows,
                    report,
                    self._publisher.exchange,
                    started_ns,
                    time.time_ns(),
                )
            await outbox.record_publish_outcome(conn, report.published, report.refused)
        self.alive_at = time.monotonic()
        self.published_total += len(report.published)
        if report.published:
            self._count_by_queue(rows, report.published)
        self.refused_total += len(report.refused)
        if report.refused:
            task_of = {row["id"]: str(row["task_id"]) for row in rows}
            for refusal in report.refused:
                log.warning(
                    "publish refused; retrying in %.1fs: %s",
                    refusal.retry_in,
                    refusal.error,
                    extra={"task_id": task_of[refusal.outbox_id], "outbox_id": refusal.outbox_id},
                )
        if report.published:
            log.debug("published %d outbox rows", len(report.published))
        if claim.claimed > len(rows) + claim.parked:
            log.debug(
                "closed %d rows of finished tasks unsent", claim.claimed - len(rows) - claim.parked
            )
        return claim.claimed

    def _count_by_queue(self, rows: list[asyncpg.Record], published: list[int]) -> None:
        queue = rows[0]["queue"]
        if all(row["queue"] == queue for row in rows):  # the usual batch: one queue
            self.metrics.published_by_queue.labels(queue).inc(len(published))
            return
        confirmed = set(published)
        for name, count in Counter(r["queue"] for r in rows if r["id"] in confirmed).items():
            self.metrics.published_by_queue.labels(name).inc(count)

    async def drain(self, stop: asyncio.Event) -> None:
        """Drain until a batch comes back short (the backlog is empty for now).

        A full first batch means a backlog: then RELAY_CONCURRENCY batches run at once,
        each on its own connection (SKIP LOCKED keeps them disjoint), so one batch's
        claim and commit overlap another's wait for confirms.
        """
        if stop.is_set():
            return
        self._resumed = []
        claimed = await self.drain_batch()
        if self._resumed:  # the claim saw resumed queues' parked rows
            await self.unpark_resumed(self._resumed)
        if claimed < self._settings.relay_batch_size:
            return
        await asyncio.gather(
            *(self._drain_until_short(stop) for _ in range(self._settings.relay_concurrency))
        )

    async def unpark_resumed(self, queues: list[str]) -> int:
        """Put one chunk of each resumed queue's parked rows back in the claim's way,
        oldest due first; how many. Any unparked row sets the wake-up, so the next drain
        follows at once: a large resumed backlog goes out a chunk at a time, the other
        queues' rows drained between the chunks rather than after the whole backlog."""
        unparked = 0
        for queue in queues:
            count = await outbox.unpark(self._pool, queue, self._unpark_chunk)
            unparked += count
            if count:
                self._wake.set()
            log.info("unparked %d rows of resumed queue %s", count, queue)
        return unparked

    async def _drain_until_short(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if await self.drain_batch(first=False) < self._settings.relay_batch_size:
                return

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            self.alive_at = time.monotonic()
            self._wake.clear()
            try:
                await self.drain(stop)
                failures = 0
            except TRANSIENT as exc:
                failures += 1
                delay = backoff_delay(failures, 0.2, 10.0)
                log.warning(
                    "drain failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay
                )
                await wait_first(stop, within=delay)
                continue
            # Sleep until a NOTIFY, the next scheduled row, the poll interval or a stop.
            await wait_first(self._wake, stop, within=self.idle_wait())

    def idle_wait(self) -> float:
        """Seconds to sleep when nothing is due: until the next row (a scheduled task
        or a retry's backoff) falls due, at most the poll interval."""
        wait = self._settings.relay_poll_interval
        if self._next_due is not None:
            claimed_at, due_in = self._next_due
            wait = min(wait, max(0.0, due_in - (time.monotonic() - claimed_at)))
        return wait
