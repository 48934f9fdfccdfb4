"""Schedules declared in a task module, through a real relay: the relay loads them from
TASK_MODULES, writes them when it takes the lead, fires them, and forgets one the
module no longer declares; a schedule the module gets wrong stops the relay at start."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from tests.integration.processes import ServiceProcess

MODULE = """
from pydantic import BaseModel
from taskbox import every, periodic, task


class Beat(BaseModel):
    n: int


@task("beat", Beat, schedule=every(1), payload={"n": 1}, catch_up="all")
def beat(payload: Beat, ctx) -> int:
    return payload.n
"""


def relay_in(tmp_path: Path, env: dict[str, str]) -> ServiceProcess:
    relay = ServiceProcess("relay", {**env, "TASK_MODULES": "beats", "LOG_LEVEL": "INFO"})
    relay.cwd = tmp_path
    return relay


async def test_a_relay_writes_fires_and_forgets_the_schedules_its_modules_declare(
    tmp_path: Path, pool: asyncpg.Pool, service_env: dict[str, str]
) -> None:
    (tmp_path / "beats.py").write_text(MODULE)
    relay = relay_in(tmp_path, service_env)
    await relay.start()
    try:
        await relay.wait_for("scheduler: this relay leads")
        for _ in range(60):
            if await pool.fetchval("SELECT count(*) FROM tasks WHERE schedule_name = 'beat'") >= 2:
                break
            await asyncio.sleep(0.1)
        row = await pool.fetchrow("SELECT * FROM schedules WHERE name = 'beat'")
        assert row is not None and row["source"] == "code", row
        assert (row["task_type"], row["interval_seconds"], row["payload"]) == (
            "beat",
            1.0,
            {"n": 1},
        )
        types = await pool.fetch("SELECT DISTINCT type, payload FROM tasks")
        assert [(t["type"], t["payload"]) for t in types] == [("beat", {"n": 1})]
    finally:
        assert await relay.stop() == 0

    # The next deployment declares it no more: the relay that leads deletes it.
    (tmp_path / "beats.py").write_text(MODULE.replace('schedule=every(1), payload={"n": 1}, ', ""))
    relay = relay_in(tmp_path, service_env)
    await relay.start()
    try:
        await relay.wait_for("schedules no longer declared in code, deleted: beat")
        assert await pool.fetchval("SELECT count(*) FROM schedules") == 0
    finally:
        assert await relay.stop() == 0


async def test_a_schedule_the_module_gets_wrong_stops_the_relay_at_start(
    tmp_path: Path, service_env: dict[str, str]
) -> None:
    (tmp_path / "beats.py").write_text(MODULE + '\nperiodic("other", "nope", every(60))\n')
    relay = relay_in(tmp_path, service_env)
    await relay.launch()
    assert await relay.wait(timeout=30) == 2
    assert "schedule 'other': no task type 'nope' is registered" in relay.output
