"""When a schedule fires: cron expressions in a time zone, or a fixed interval.

The cron library is cronsim (healthchecks.io), chosen over croniter in December 2026:
croniter's original maintainer declared it unmaintained in 2024/2025 (it lives on
under pallets-eco since), while cronsim is maintained by the project that runs it in
production for cron monitoring, is typed (py.typed), and handles DST as Vixie cron
does, which is what operators expect of a cron line:

- a time the zone skips (02:30 on Europe/Berlin's spring-forward day) fires once, at
  the first moment after the gap (03:00);
- a time the zone repeats (01:30 on America/New_York's fall-back day) fires once, on
  its first occurrence.

Every fire time leaves this module as an aware UTC datetime: that is what is stored
(timestamptz) and compared with the database clock. Interval schedules ignore the
zone: every N seconds is N seconds whatever the wall clock does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

CatchUp = Literal["skip", "all"]
CATCH_UP_POLICIES: tuple[CatchUp, ...] = ("skip", "all")

# cronsim has no fire time past year 9999; a cron line that never matches (Feb 30)
# raises StopIteration at once instead of searching for ever.
_MAX_INTERVAL = 366 * 86400.0


class InvalidTiming(ValueError):
    """A cron line, zone or interval that cannot be used; ``field`` names which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` (Europe/Berlin, UTC), or InvalidTiming for ``timezone``."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidTiming("timezone", f"unknown time zone {name!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class Cron:
    """A five-field cron line read in ``timezone``."""

    expression: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        tz = zone(self.timezone)
        if len(self.expression.split()) != 5:
            # cronsim also reads a six-field line (seconds first); one reading only, the
            # one every crontab uses.
            raise InvalidTiming("cron", f"{self.expression!r} needs five fields: m h dom mon dow")
        try:
            next(CronSim(self.expression, datetime(2000, 1, 1, tzinfo=tz)))
        except CronSimError as exc:
            raise InvalidTiming("cron", f"{self.expression!r} is not a cron line: {exc}") from None
        except StopIteration:
            raise InvalidTiming("cron", f"{self.expression!r} never fires") from None

    def after(self, moment: datetime) -> Iterator[datetime]:
        """Fire times strictly after ``moment``, in UTC."""
        local = moment.astimezone(zone(self.timezone))
        for fire in CronSim(self.expression, local):
            yield fire.astimezone(UTC)

    def before(self, moment: datetime) -> Iterator[datetime]:
        """Fire times strictly before ``moment``, latest first, in UTC."""
        local = moment.astimezone(zone(self.timezone))
        for fire in CronSim(self.expression, local, reverse=True):
            yield fire.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Interval:
    """Every ``seconds``, counted from the schedule's previous fire time."""

    seconds: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.seconds) and 0 < self.seconds <= _MAX_INTERVAL):
            raise InvalidTiming(
                "interval_seconds",
                f"must be > 0 and at most {_MAX_INTERVAL:.0f}, not {self.seconds}",
            )

    @property
    def step(self) -> timedelta:
        return timedelta(seconds=self.seconds)


Timing = Cron | Interval


def cron(expression: str, tz: str = "UTC") -> Cron:
    """``@task(..., schedule=cron("0 6 * * 1-5", tz="Europe/Berlin"))``."""
    return Cron(expression, tz)


def every(seconds: float) -> Interval:
    """``@task(..., schedule=every(300))``: every five minutes."""
    return Interval(float(seconds))


def timing_of(cron_line: str | None, interval_seconds: float | None, timezone: str) -> Timing:
    """A stored schedule's timing: exactly one of the cron line and the interval."""
    if (cron_line is None) == (interval_seconds is None):
        raise InvalidTiming("cron", "give exactly one of cron and interval_seconds")
    if cron_line is not None:
        return Cron(cron_line, timezone)
    assert interval_seconds is not None
    zone(timezone)  # checked even where unused, so a typo never hides until a switch to cron
    return Interval(interval_seconds)


def first_fire_time(timing: Timing, now: datetime) -> datetime:
    """When a schedule created (or re-timed) at ``now`` fires first."""
    if isinstance(timing, Interval):
        return now + timing.step
    return next(timing.after(now))


def next_fire_times(timing: Timing, after: datetime, count: int) -> list[datetime]:
    """The ``count`` fire times from ``after`` on, ``after`` itself first (it is the
    stored next fire time, which is a fire time)."""
    times = [after]
    if isinstance(timing, Interval):
        times += [after + timing.step * k for k in range(1, count)]
        return times
    for fire in timing.after(after):
        if len(times) >= count:
            break
        times.append(fire)
    return times[:count]


@dataclass(frozen=True, slots=True)
class DueTicks:
    """What a scheduler does with one schedule at ``now``: create a task for each of
    ``fire_times`` (oldest first), count ``skipped`` missed ones, store ``next_fire_at``."""

    fire_times: list[datetime]
    skipped: int
    next_fire_at: datetime


def due_fire_times(
    timing: Timing, next_fire_at: datetime, now: datetime, catch_up: CatchUp, bound: int
) -> DueTicks:
    """The ticks due at ``now`` of a schedule whose stored next fire time is
    ``next_fire_at`` (<= now), and the next fire time after them.

    ``skip``: only the latest due tick (on time, that is the only one; after an outage,
    one task now for the last missed tick); ``all``: every due tick, but at most the
    latest ``bound`` of them, so a schedule down for a month cannot flood the queue.
    Ticks are counted from the stored time forward (never from ``now``), so a late
    scheduler neither skips nor shifts a tick inside the policy.
    """
    keep = 1 if catch_up == "skip" else max(1, bound)
    if isinstance(timing, Interval):
        behind = (now - next_fire_at) / timing.step  # how many steps past the stored one
        missed = math.floor(behind)
        latest = next_fire_at + timing.step * missed
        kept = min(keep, missed + 1)
        fires = [latest - timing.step * k for k in range(kept - 1, -1, -1)]
        return DueTicks(fires, missed + 1 - kept, latest + timing.step)
    # A cron line walked backwards from just past now: the latest due ticks, bounded,
    # however long the outage (walking forward from the stored time would not be).
    newest_first: list[datetime] = []
    skipped = 0
    for fire in timing.before(now + timedelta(microseconds=1)):
        if fire < next_fire_at:
            break
        if len(newest_first) < keep:
            newest_first.append(fire)
        else:
            skipped += 1
            if skipped > 100_000:  # only reported; no need to count a decade of minutes
                break
    if not newest_first:
        # The stored time is not on the line (the line was edited): it fires once as stored.
        newest_first = [next_fire_at]
    return DueTicks(newest_first[::-1], skipped, next(timing.after(max(now, newest_first[0]))))
