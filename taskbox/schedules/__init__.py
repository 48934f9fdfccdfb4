"""Periodic tasks: when a schedule fires (``timing``) and how one is declared in code
(``cron``, ``every``). Imports no other Taskbox package but ``runtime``, so the api,
the relay's scheduler, ``db`` and ``tasktypes`` all share one reading of a schedule."""

from taskbox.schedules.timing import (
    CATCH_UP_POLICIES,
    CatchUp,
    Cron,
    Interval,
    InvalidTiming,
    Timing,
    cron,
    due_fire_times,
    every,
    timing_of,
)

__all__ = [
    "CATCH_UP_POLICIES",
    "CatchUp",
    "Cron",
    "Interval",
    "InvalidTiming",
    "Timing",
    "cron",
    "due_fire_times",
    "every",
    "timing_of",
]
