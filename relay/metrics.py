"""The relay's Prometheus metrics.

Counters the relay keeps anyway (rows published and refused, LISTEN reconnects) are
read at scrape time; the backlog gauges come from one query on a timer
(``RELAY_BACKLOG_INTERVAL``), never from the publish path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from taskbox.db.overview import Backlog
from taskbox.db.queues import QueueView
from taskbox.runtime.probes import new_registry

# Publishing a batch takes milliseconds when the broker is well and up to
# RELAY_PUBLISH_TIMEOUT (10 s) when it is not.
PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.publish_seconds = Histogram(
            "taskbox_relay_publish_batch_seconds",
            "Seconds to publish one claimed batch and receive the broker's confirms.",
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        self.backlog_rows = Gauge(
            "taskbox_outbox_backlog_rows",
            "Unpublished outbox rows, including retries waiting out their backoff.",
            registry=r,
        )
        self.due_rows = Gauge(
            "taskbox_outbox_due_rows", "Unpublished outbox rows due for publishing now.", registry=r
        )
        self.failing_rows = Gauge(
            "taskbox_outbox_failing_rows",
            "Unpublished outbox rows whose last publish the broker refused.",
            registry=r,
        )
        self.lag_seconds = Gauge(
            "taskbox_outbox_lag_seconds",
            "Seconds the oldest due unpublished outbox row has waited (0: none waits).",
            registry=r,
        )
        self.parked_rows = Gauge(
            "taskbox_outbox_parked_rows",
            "Unpublished outbox rows of paused queues, waiting for a resume (not in the "
            "backlog above).",
            registry=r,
        )
        self.published_by_queue = Counter(
            "taskbox_relay_queue_published",
            "Outbox rows published and confirmed, by queue: each queue's publish rate.",
            ["queue"],
            registry=r,
        )
        self.queue_waiting = Gauge(
            "taskbox_queue_waiting_tasks",
            "Tasks NEW or PENDING, by queue (its depth).",
            ["queue"],
            registry=r,
        )
        self.queue_running = Gauge(
            "taskbox_queue_running_tasks", "Tasks PROCESSING, by queue.", ["queue"], registry=r
        )
        self.queue_lag = Gauge(
            "taskbox_queue_oldest_waiting_seconds",
            "Seconds the longest-waiting task of the queue that may run now has waited "
            "(0: none waits): its lag.",
            ["queue"],
            registry=r,
        )
        self.queue_consumers = Gauge(
            "taskbox_queue_consumers",
            "Consumers seen serving the queue within the last minute (0 with tasks "
            "waiting: nothing runs them).",
            ["queue"],
            registry=r,
        )
        self.queue_paused = Gauge(
            "taskbox_queue_paused", "1 while the queue is paused.", ["queue"], registry=r
        )
        self._queues_seen: set[str] = set()
        self.retention_deleted = Counter(
            "taskbox_retention_deleted",
            "Rows deleted by retention sweeps of this process.",
            ["table"],
            registry=r,
        )
        for table in ("outbox", "tasks"):
            self.retention_deleted.labels(table)
        self.scheduler_leader = Gauge(
            "taskbox_scheduler_leader",
            "1 while this relay is the scheduler (holds the leader lock), else 0.",
            registry=r,
        )
        self.schedule_ticks = Counter(
            "taskbox_schedule_ticks",
            "Schedule ticks this relay turned into tasks (created) or left out by the "
            "catch-up policy (skipped).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("created", "skipped"):
            self.schedule_ticks.labels(outcome)

        self.webhook_deliveries = Counter(
            "taskbox_webhook_deliveries",
            "Webhook delivery attempts settled by this relay, by what followed: delivered, "
            "retried (a later attempt is scheduled) or failed (no attempts left).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("delivered", "retried", "failed"):
            self.webhook_deliveries.labels(outcome)
        self.webhook_attempt_seconds = Histogram(
            "taskbox_webhook_attempt_seconds",
            "Seconds one webhook delivery attempt took, the receiver's answer included.",
            buckets=PUBLISH_BUCKETS,
            registry=r,
        )
        self.webhook_backlog = Gauge(
            "taskbox_webhook_pending_deliveries",
            "Webhook deliveries not yet delivered or failed (due or waiting out a backoff).",
            registry=r,
        )

    def record_backlog(self, backlog: Backlog) -> None:
        self.backlog_rows.set(backlog.rows)
        self.due_rows.set(backlog.due)
        self.failing_rows.set(backlog.failing)
        self.lag_seconds.set(backlog.lag)
        self.parked_rows.set(backlog.parked)

    def record_queues(self, found: list[QueueView]) -> None:
        """The per-queue gauges; a queue no longer in use loses its series."""
        names = {queue.name for queue in found}
        for gone in self._queues_seen - names:
            for gauge in self._queue_gauges():
                gauge.remove(gone)
        self._queues_seen = names
        for queue in found:
            self.queue_waiting.labels(queue.name).set(queue.waiting)
            self.queue_running.labels(queue.name).set(queue.running)
            self.queue_lag.labels(queue.name).set(queue.oldest_waiting_seconds or 0.0)
            self.queue_consumers.labels(queue.name).set(queue.consumers)
            self.queue_paused.labels(queue.name).set(1.0 if queue.paused else 0.0)

    def _queue_gauges(self) -> tuple[Gauge, ...]:
        return (
            self.queue_waiting,
            self.queue_running,
            self.queue_lag,
            self.queue_consumers,
            self.queue_paused,
        )
