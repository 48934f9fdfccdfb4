"""The relay's per-queue gauges: one series per queue in use, gone with the queue."""

from __future__ import annotations

from taskbox.db.queues import QueueView
from taskbox.relay.metrics import RelayMetrics


def sample(metrics: RelayMetrics, name: str, queue: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"queue": queue})


def test_each_queue_gets_its_series_and_a_queue_gone_loses_them() -> None:
    metrics = RelayMetrics()
    metrics.record_queues(
        [
            QueueView("default", 3, 1, 12.5, 2),
            QueueView("media", 7, 0, None, 0, paused=True),
        ]
    )
    assert sample(metrics, "taskbox_queue_waiting_tasks", "default") == 3
    assert sample(metrics, "taskbox_queue_running_tasks", "default") == 1
    assert sample(metrics, "taskbox_queue_oldest_waiting_seconds", "default") == 12.5
    assert sample(metrics, "taskbox_queue_oldest_waiting_seconds", "media") == 0
    assert sample(metrics, "taskbox_queue_consumers", "media") == 0
    assert sample(metrics, "taskbox_queue_paused", "media") == 1
    assert sample(metrics, "taskbox_queue_paused", "default") == 0

    metrics.record_queues([QueueView("default", 0, 0, None, 2)])
    assert sample(metrics, "taskbox_queue_waiting_tasks", "default") == 0
    for name in ("waiting_tasks", "running_tasks", "oldest_waiting_seconds", "consumers", "paused"):
        assert sample(metrics, f"taskbox_queue_{name}", "media") is None, name
