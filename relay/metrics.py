"""The relay's Prometheus metrics.

Counters the relay keeps anyway (rows published and refused, LISTEN reconnects) are
read at scrape time; the backlog gauges come from one query on a timer
(``RELAY_BACKLOG_INTERVAL``), never from the publish path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from taskbox.db.overview import Backlog
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

    def record_backlog(self, backlog: Backlog) -> None:
        self.backlog_rows.set(backlog.rows)
        self.due_rows.set(backlog.due)
        self.failing_rows.set(backlog.failing)
        self.lag_seconds.set(backlog.lag)
