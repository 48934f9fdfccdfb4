"""The schedule maths (taskbox.schedules.timing): cron lines in a zone across both DST
changes, interval schedules, the catch-up policies and the next fire times."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from taskbox.schedules.timing import (
    Cron,
    Interval,
    InvalidTiming,
    due_fire_times,
    first_fire_time,
    next_fire_times,
    timing_of,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def local(moment: datetime, zone: ZoneInfo) -> datetime:
    return moment.astimezone(zone)


def fires_between(timing: Cron, start: datetime, end: datetime) -> list[datetime]:
    """Every fire time in [start, end), found as a scheduler finds them."""
    found = []
    fire = first_fire_time(timing, start - timedelta(microseconds=1))
    while fire < end:
        found.append(fire)
        fire = due_fire_times(timing, fire, fire, "all", 100).next_fire_at
    return found


def test_a_time_the_spring_forward_skips_fires_once_that_day() -> None:
    # Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    daily = Cron("30 2 * * *", "Europe/Berlin")
    start = datetime(2026, 3, 28, 0, 0, tzinfo=BERLIN)
    fires = fires_between(daily, start, start + timedelta(days=3))
    days = [local(fire, BERLIN).date().isoformat() for fire in fires]
    assert days == ["2026-03-28", "2026-03-29", "2026-03-30"]
    # On the day itself it fires once, at the first moment after the gap, as cron does.
    assert local(fires[1], BERLIN).strftime("%H:%M %Z") == "03:00 CEST"
    assert fires[1] == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


def test_a_time_the_fall_back_repeats_fires_once_that_day() -> None:
    # America/New_York, 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
    daily = Cron("30 1 * * *", "America/New_York")
    start = datetime(2026, 10, 31, 0, 0, tzinfo=NEW_YORK)
    fires = fires_between(daily, start, start + timedelta(days=3))
    days = [local(fire, NEW_YORK).date().isoformat() for fire in fires]
    assert days == ["2026-10-31", "2026-11-01", "2026-11-02"]
    # The first 01:30 (EDT, UTC-4) only; the repeat an hour later (EST) does not fire.
    assert fires[1] == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)


def test_an_hourly_line_keeps_one_fire_per_real_hour_across_the_fall_back() -> None:
    hourly = Cron("0 * * * *", "America/New_York")
    start = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)  # 00:00 EDT
    fires = fires_between(hourly, start, start + timedelta(hours=4))
    # 00:00 EDT, 01:00 EDT, 01:00 EST is the repeated wall time: cron fires it once.
    assert len(fires) == len(set(fires))
    assert all(fire.tzinfo is UTC for fire in fires)


def test_fire_times_are_utc_and_next_five_follow_the_line() -> None:
    weekdays = Cron("0 6 * * 1-5", "Europe/Berlin")
    first = first_fire_time(weekdays, datetime(2026, 12, 4, 12, 0, tzinfo=UTC))  # a Friday
    five = next_fire_times(weekdays, first, 5)
    assert [local(f, BERLIN).strftime("%a %H:%M") for f in five] == [
        "Mon 06:00",
        "Tue 06:00",
        "Wed 06:00",
        "Thu 06:00",
        "Fri 06:00",
    ]
    assert five[0] == datetime(2026, 12, 7, 5, 0, tzinfo=UTC)


def test_interval_next_five() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert next_fire_times(Interval(30), start, 5)[-1] == start + timedelta(seconds=120)


def test_on_time_both_policies_create_the_one_due_tick() -> None:
    every_minute = Cron("* * * * *")
    due_at = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    for policy in ("skip", "all"):
        ticks = due_fire_times(every_minute, due_at, due_at + timedelta(seconds=2), policy, 10)
        assert ticks.fire_times == [due_at]
        assert ticks.skipped == 0
        assert ticks.next_fire_at == due_at + timedelta(minutes=1)


def test_skip_after_an_outage_creates_one_task_for_the_last_missed_tick() -> None:
    every_minute = Cron("* * * * *")
    due_at = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    now = due_at + timedelta(minutes=10, seconds=30)
    ticks = due_fire_times(every_minute, due_at, now, "skip", 100)
    assert ticks.fire_times == [due_at + timedelta(minutes=10)]
    assert ticks.skipped == 10
    assert ticks.next_fire_at == due_at + timedelta(minutes=11)


def test_all_after_an_outage_creates_each_missed_tick_up_to_the_bound() -> None:
    every_minute = Cron("* * * * *")
    due_at = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    now = due_at + timedelta(minutes=10, seconds=30)
    ticks = due_fire_times(every_minute, due_at, now, "all", 100)
    assert ticks.fire_times == [due_at + timedelta(minutes=k) for k in range(11)]
    assert ticks.skipped == 0
    bounded = due_fire_times(every_minute, due_at, now, "all", 3)
    # The latest three; the older ones are counted as skipped.
    assert bounded.fire_times == [due_at + timedelta(minutes=k) for k in (8, 9, 10)]
    assert bounded.skipped == 8
    assert bounded.next_fire_at == due_at + timedelta(minutes=11)


def test_interval_catch_up_policies() -> None:
    due_at = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    now = due_at + timedelta(seconds=4.5)
    every_second = Interval(1)
    assert due_fire_times(every_second, due_at, now, "all", 100).fire_times == [
        due_at + timedelta(seconds=k) for k in range(5)
    ]
    skip = due_fire_times(every_second, due_at, now, "skip", 100)
    assert skip.fire_times == [due_at + timedelta(seconds=4)]
    assert skip.skipped == 4
    assert skip.next_fire_at == due_at + timedelta(seconds=5)
    bounded = due_fire_times(every_second, due_at, now, "all", 2)
    assert bounded.fire_times == [due_at + timedelta(seconds=k) for k in (3, 4)]


def test_a_long_outage_is_bounded_work() -> None:
    every_minute = Cron("* * * * *")
    due_at = datetime(2025, 1, 1, tzinfo=UTC)
    ticks = due_fire_times(every_minute, due_at, due_at + timedelta(days=365), "skip", 100)
    assert len(ticks.fire_times) == 1


@pytest.mark.parametrize(
    ("cron", "interval", "zone", "field"),
    [
        ("61 * * * *", None, "UTC", "cron"),
        ("* * *", None, "UTC", "cron"),
        ("0 0 30 2 *", None, "UTC", "cron"),
        ("* * * * *", None, "Mars/Olympus", "timezone"),
        (None, 0.0, "UTC", "interval_seconds"),
        (None, None, "UTC", "cron"),
        ("* * * * *", 5.0, "UTC", "cron"),
        (None, 5.0, "Nowhere/Else", "timezone"),
    ],
)
def test_invalid_timing_names_its_field(
    cron: str | None, interval: float | None, zone: str, field: str
) -> None:
    with pytest.raises(InvalidTiming) as caught:
        timing_of(cron, interval, zone)
    assert caught.value.field == field
