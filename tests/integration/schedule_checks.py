"""What the periodic-task tests count: each tick of a schedule's tasks, by fire time."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg


@dataclass(frozen=True, slots=True)
class TickCount:
    """A schedule's ticks from its first to its last fire time on record, at ``step``:
    ``missing`` fire times without a task, ``duplicated`` ones with several."""

    ticks: int
    missing: list[datetime]
    duplicated: list[datetime]
    first: datetime | None
    last: datetime | None

    def __str__(self) -> str:
        return (
            f"ticks={self.ticks} ticks_missing={len(self.missing)} "
            f"ticks_duplicated={len(self.duplicated)}"
        )


async def count_ticks(conn: asyncpg.Connection, schedule: str, step: timedelta) -> TickCount:
    rows = await conn.fetch(
        "SELECT schedule_fire_at FROM tasks WHERE schedule_name = $1"
        " AND schedule_fire_at IS NOT NULL",
        schedule,
    )
    fires = Counter(row["schedule_fire_at"] for row in rows)
    if not fires:
        return TickCount(0, [], [], None, None)
    first, last = min(fires), max(fires)
    expected = []
    moment = first
    while moment <= last:
        expected.append(moment)
        moment += step
    missing = [moment for moment in expected if moment not in fires]
    duplicated = sorted(moment for moment, n in fires.items() if n > 1)
    return TickCount(len(expected), missing, duplicated, first, last)
