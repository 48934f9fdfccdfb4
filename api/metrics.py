"""The API's Prometheus metrics, served at ``/metrics``.

Each uvicorn worker process has its own registry: with API_WORKERS > 1 a scrape through
the shared port sees one worker's counts (scrape each worker, or run one worker per
container and scale containers).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from taskbox.runtime.probes import new_registry


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else new_registry()
        self.tasks_created = Counter(
            "taskbox_api_tasks_created",
            "Tasks created (committed with their outbox row), by task type.",
            ["type"],
            registry=self.registry,
        )
