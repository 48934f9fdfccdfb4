"""Exactly one task per schedule tick, against the real Postgres: several schedulers at
once with no leader between them, and a scheduler killed inside its tick transaction.

(The relay cluster, with its leader killed and its session cut, is
test_scheduler_failover.py.)
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from taskbox.db.pool import connect
from taskbox.db.schedules import ScheduleDefinition, create_schedule, fire_due, get_schedule
from taskbox.db.settings import DatabaseSettings
from tests.integration.processes import ServiceProcess
from tests.integration.schedule_checks import count_ticks

STEP = timedelta(milliseconds=100)


async def test_schedulers_racing_without_a_leader_create_each_tick_exactly_once(
    db_settings: DatabaseSettings,
) -> None:
    """The leader lock is only an economy: four schedulers firing the same schedule as
    fast as they can, each on its own connection, still create every tick once. What
    holds it is the claim's row lock, the same-transaction advance and the unique key
    on (schedule, fire time)."""
    owner = await connect(db_settings)
    schedulers = [await connect(db_settings) for _ in range(4)]
    try:
        definition = ScheduleDefinition(
            "race", "echo", {}, interval_seconds=STEP.total_seconds(), catch_up="all"
        )
        # Started in the past: the first passes catch up on about 20 ticks at once.
        await create_schedule(owner, definition, datetime.now(UTC) - timedelta(seconds=2))
        deadline = time.monotonic() + 4.0

        async def scheduler(conn: asyncpg.Connection) -> int:
            created = 0
            while time.monotonic() < deadline:
                created += len((await fire_due(conn, catch_up_max=1000)).created)
                await asyncio.sleep(0.001)
            return created

        created = await asyncio.gather(*(scheduler(conn) for conn in schedulers))
        counted = await count_ticks(owner, "race", STEP)
        print(f"racing schedulers: created {created}; {counted}")
        assert counted.duplicated == []
        assert counted.missing == []
        assert sum(created) == counted.ticks >= 55
        assert min(created) >= 0 and sum(1 for n in created if n) >= 2, created
        # The schedule's next tick is the one after the last task's.
        row = await get_schedule(owner, "race")
        assert row is not None and counted.last is not None
        assert row["next_fire_at"] == counted.last + STEP
    finally:
        for conn in [owner, *schedulers]:
            await conn.close()


async def test_a_scheduler_killed_inside_its_tick_transaction_leaves_nothing_behind(
    db_settings: DatabaseSettings, service_env: dict[str, str]
) -> None:
    """A relay killed (exit 137, no commit) after inserting a tick's task but before the
    schedule's advance commits: neither survives, and the next scheduler creates that
    very tick, once."""
    owner = await connect(db_settings)
    try:
        # catch_up=all: the tick the killed relay held must still get its task, however
        # long the restart takes.
        definition = ScheduleDefinition("crashy", "echo", {}, interval_seconds=1.0, catch_up="all")
        await create_schedule(owner, definition, datetime.now(UTC) - timedelta(seconds=1))
        before = await get_schedule(owner, "crashy")
        assert before is not None
        doomed = ServiceProcess("relay", service_env, TASKBOX_FAILPOINTS="scheduler.before_advance")
        await doomed.launch()
        assert await doomed.wait(timeout=30) == 137, doomed.output
        assert "failpoint scheduler.before_advance" in doomed.output
        assert await owner.fetchval("SELECT count(*) FROM tasks") == 0
        after_crash = await get_schedule(owner, "crashy")
        assert after_crash is not None
        assert after_crash["next_fire_at"] == before["next_fire_at"]

        survivor = ServiceProcess("relay", service_env)
        await survivor.start()
        try:
            for _ in range(150):  # 15 s at most
                if await owner.fetchval("SELECT count(*) FROM tasks") >= 3:
                    break
                await asyncio.sleep(0.1)
        finally:
            assert await survivor.stop() == 0
        counted = await count_ticks(owner, "crashy", timedelta(seconds=1))
        assert counted.duplicated == [] and counted.missing == []
        # The tick the killed relay had inserted is the first one on record.
        assert counted.first == before["next_fire_at"]
    finally:
        await owner.close()


async def test_a_schedule_whose_timing_no_longer_reads_never_stops_the_others(
    db_settings: DatabaseSettings,
) -> None:
    """A stored zone the tz database no longer has (or a row written by hand): the
    schedule is reported and left due, and every other schedule fires as before."""
    owner = await connect(db_settings)
    try:
        await owner.execute(
            "INSERT INTO schedules (name, task_type, interval_seconds, timezone, next_fire_at)"
            " VALUES ('broken', 'echo', 1, 'Gone/Zone', now() - interval '1 hour')"
        )
        await create_schedule(
            owner,
            ScheduleDefinition("healthy", "echo", {}, interval_seconds=1.0),
            datetime.now(UTC) - timedelta(seconds=1),
        )
        report = await fire_due(owner, catch_up_max=10)
        assert list(report.broken) == ["broken"]
        assert "Gone/Zone" in report.broken["broken"]
        assert [tick.schedule for tick in report.created] == ["healthy"]
        broken = await get_schedule(owner, "broken")
        assert broken is not None and broken["next_fire_at"] < datetime.now(UTC)
    finally:
        await owner.close()
