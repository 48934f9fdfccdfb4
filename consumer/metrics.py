"""The consumer's Prometheus metrics.

Counted where the consumer already touches each task (after the completion commit, on a
dead-letter, on a rescue): an increment or an observation in memory, never a query.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from taskbox.runtime.probes import new_registry

# Handlers run from milliseconds to HANDLER_TIMEOUT (300 s by default) and beyond.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip

# How an attempt ended, as the `status` label: the task's status after it, except that a
# retry (back to NEW) is RETRY and a task handed back at shutdown is RELEASED.
STATUS_LABELS = {"NEW": "RETRY", "PENDING": "RELEASED"}


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.outcomes = Counter(
            "taskbox_consumer_tasks",
            "Attempts whose outcome was committed, by task type and status "
            "(DONE, FAILED, CANCELLED, RETRY, RELEASED).",
            ["type", "status"],
            registry=r,
        )
        self.queue_outcomes = Counter(
            "taskbox_consumer_queue_tasks",
            "Attempts whose outcome was committed, by queue and status: each queue's "
            "completion rate.",
            ["queue", "status"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "taskbox_consumer_handler_seconds",
            "Seconds one attempt's handler ran, by task type.",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "taskbox_task_end_to_end_seconds",
            "Seconds from a task's creation to its final outcome (DONE, FAILED, CANCELLED), "
            "retries included, by task type.",
            ["type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "taskbox_consumer_retries",
            "Failed attempts sent back through the outbox for another try, by task type.",
            ["type"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "taskbox_consumer_dead_lettered",
            "Messages rejected into the dead-letter queue, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in ("malformed", "no_such_task"):
            self.dead_lettered.labels(reason)
        self.rescued = Counter(
            "taskbox_consumer_rescued",
            "Tasks whose consumer stopped heartbeating, rescued by this consumer, by the "
            "status they were moved to (NEW, FAILED, CANCELLED).",
            ["status"],
            registry=r,
        )
        self.duplicates = Counter(
            "taskbox_consumer_duplicates",
            "Deliveries dropped because their task was already finished or running elsewhere.",
            registry=r,
        )

        self.ownership_lost = Counter(
            "taskbox_consumer_ownership_lost",
            "Running attempts stopped because their heartbeat found the task no longer "
            "theirs (rescued after a stall or a partition); their messages are claimed again.",
            registry=r,
        )
        self.refused = Counter(
            "taskbox_consumer_outcomes_refused",
            "Outcomes the fence refused (the task changed owner meanwhile); their messages "
            "are claimed again.",
            registry=r,
        )
        self.abandoned = Counter(
            "taskbox_consumer_handlers_abandoned",
            "Handlers that ignored their timeout or a stop past HANDLER_CANCEL_GRACE: the "
            "attempt's outcome was written without them, by why they were stopped "
            "(timeout, cancel, shutdown).",
            ["reason"],
            registry=r,
        )
        self.dead_letters = Counter(
            "taskbox_consumer_dead_letters_watched",
            "Dead-lettered messages the dead-letter watch decided on, by outcome: requeued "
            "(its task sent again through the outbox), not_needed (the task was finished, "
            "running or had a newer message), not_a_task, error (kept for later).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("requeued", "not_needed", "not_a_task", "error"):
            self.dead_letters.labels(outcome)
        self.unstorable = Counter(
            "taskbox_consumer_unstorable_outcomes",
            "Outcomes Postgres refused to store, written instead as FAILED UnstorableOutcome.",
            registry=r,
        )

    def outcome(self, task_type: str, status: str, queue: str) -> None:
        label = STATUS_LABELS.get(status, status)
        self.outcomes.labels(task_type, label).inc()
        self.queue_outcomes.labels(queue, label).inc()
        if status == "NEW":
            self.retries.labels(task_type).inc()
