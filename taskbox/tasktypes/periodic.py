"""Schedules declared in code: ``@task(..., schedule=cron(...), payload={...})`` or
``periodic(name, task_type, schedule, ...)``, kept by the registry they were declared on.

The relay's scheduler writes them to the ``schedules`` table when it takes the lead
(relay.scheduler), where the api shows them read-only: they change by deploying code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from taskbox.runtime.queues import check_queue_name
from taskbox.schedules.naming import check_schedule_name
from taskbox.schedules.timing import CATCH_UP_POLICIES, CatchUp, Cron, Interval, Timing


@dataclass(frozen=True, slots=True)
class Periodic:
    """A schedule named ``name`` that creates a ``task_type`` task with ``payload`` on
    every tick of ``timing``. ``queue`` and ``max_attempts`` None: the type's own."""

    name: str
    task_type: str
    timing: Timing
    payload: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    queue: str | None = None
    max_attempts: int | None = None
    catch_up: CatchUp = "skip"

    def __post_init__(self) -> None:
        check_schedule_name(self.name)
        if not isinstance(self.timing, Cron | Interval):
            raise ValueError("schedule= takes cron(...) or every(...)")
        if not 0 <= self.priority <= 9:
            raise ValueError(f"priority must be between 0 and 9, not {self.priority!r}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {self.max_attempts!r}")
        if self.catch_up not in CATCH_UP_POLICIES:
            raise ValueError(f"catch_up is one of {', '.join(CATCH_UP_POLICIES)}")
        if self.queue is not None:
            check_queue_name(self.queue)
