"""/api/v1/schedules against the real app and Postgres: create, list, get (next five fire
times, last ticks), change, pause and resume, run now, delete; the 422s name the field;
code schedules are read-only. The scheduler's part is db.schedules.fire_due, called here
as the leading relay calls it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from taskbox.api.settings import ApiSettings
from taskbox.db.pool import connect
from taskbox.db.schedules import ScheduleDefinition, fire_due, sync_code_schedules
from taskbox.db.settings import DatabaseSettings
from tests.integration.conftest import app_client_for

URL = "/api/v1/schedules"


@pytest.fixture
async def scheduler(db_settings: DatabaseSettings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to fire due ticks on, as the leading relay's scheduler does."""
    conn = await connect(db_settings)
    yield conn
    await conn.close()


async def fire(conn: asyncpg.Connection) -> int:
    return len((await fire_due(conn, catch_up_max=100)).created)


def iso(moment: str) -> datetime:
    return datetime.fromisoformat(moment.replace("Z", "+00:00"))


async def test_create_list_get_show_the_next_five_fire_times(client: httpx.AsyncClient) -> None:
    body = {
        "name": "weekday-report",
        "type": "echo",
        "payload": {"report": "daily"},
        "cron": "0 6 * * 1-5",
        "timezone": "Europe/Berlin",
        "priority": 4,
    }
    created = await client.post(URL, json=body)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == f"{URL}/weekday-report"
    schedule = created.json()
    assert schedule["source"] == "api" and schedule["catch_up"] == "skip"
    assert schedule["queue"] == "default" and schedule["max_attempts"] == 3
    assert (await client.post(URL, json=body)).status_code == 409

    listed = (await client.get(URL)).json()["items"]
    assert [item["name"] for item in listed] == ["weekday-report"]

    detail = (await client.get(f"{URL}/weekday-report")).json()
    fires = [iso(moment) for moment in detail["next_fire_times"]]
    assert len(fires) == 5 and fires[0] == iso(detail["next_fire_at"])
    for moment in fires:  # 06:00 in Berlin on a weekday, whatever the UTC offset
        local = moment.astimezone(ZoneInfo("Europe/Berlin"))
        assert (local.hour, local.minute) == (6, 0) and local.weekday() < 5
    assert detail["last_ticks"] == []
    assert (await client.get(f"{URL}/nope")).status_code == 404


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"cron": "61 * * * *"}, ["body", "cron"]),
        ({"cron": "* * *"}, ["body", "cron"]),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, ["body", "timezone"]),
        ({"interval_seconds": 60, "timezone": "Nowhere"}, ["body", "timezone"]),
        ({}, ["body", "cron"]),
        ({"cron": "* * * * *", "interval_seconds": 5.0}, ["body", "cron"]),
        ({"interval_seconds": 0}, ["body", "interval_seconds"]),
        ({"interval_seconds": 0.001}, ["body", "interval_seconds"]),
        ({"interval_seconds": 5, "type": "nope"}, ["body", "type"]),
        ({"interval_seconds": 5, "type": "sleep", "payload": {"seconds": -1}}, None),
        ({"interval_seconds": 5, "queue": "elsewhere"}, ["body", "queue"]),
        ({"interval_seconds": 5, "catch_up": "some"}, ["body", "catch_up"]),
        ({"interval_seconds": 5, "name": "no spaces"}, ["body", "name"]),
    ],
)
async def test_an_invalid_schedule_is_a_422_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], loc: list[str] | None
) -> None:
    response = await client.post(URL, json={"name": "bad", "type": "echo", **body})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    if loc is None:  # the payload's own field
        loc = ["body", "payload", "seconds"]
    assert problem["errors"][0]["loc"] == loc, problem
    assert (await client.get(URL)).json()["items"] == []


@pytest.mark.parametrize("field", ["type", "payload", "timezone", "priority", "catch_up", "paused"])
async def test_an_edit_giving_null_where_none_is_allowed_is_a_422_naming_the_field(
    client: httpx.AsyncClient, field: str
) -> None:
    """The document shows these fields without null (fuzz finding: a null priority was a
    500 in a constraint check); the service refuses one with a 422 naming it."""
    made = await client.post(URL, json={"name": "nulls", "type": "echo", "interval_seconds": 60})
    assert made.status_code == 201, made.text
    response = await client.patch(f"{URL}/nulls", json={field: None})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["body", field]


@pytest.mark.parametrize("queue", ["", "q" * 201])
async def test_a_queue_the_task_model_refuses_is_a_422_on_create_and_edit(
    client: httpx.AsyncClient, queue: str
) -> None:
    """Fuzz finding: an edit's empty queue passed the schedule's schema and failed the
    task's model in the service, a 500."""
    made = await client.post(URL, json={"name": "q", "type": "echo", "interval_seconds": 60})
    assert made.status_code == 201, made.text
    for response in (
        await client.patch(f"{URL}/q", json={"queue": queue}),
        await client.post(
            URL, json={"name": "q2", "type": "echo", "interval_seconds": 60, "queue": queue}
        ),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["loc"] == ["body", "queue"]


async def test_an_edit_takes_effect_at_the_next_tick(
    client: httpx.AsyncClient, scheduler: asyncpg.Connection
) -> None:
    body = {"name": "beat", "type": "echo", "payload": {"v": 1}, "interval_seconds": 1}
    assert (await client.post(URL, json=body)).status_code == 201
    await asyncio.sleep(1.1)
    assert await fire(scheduler) == 1
    first = (await client.get(f"{URL}/beat")).json()
    assert first["last_ticks"][0]["fire_at"] is not None

    patched = await client.patch(f"{URL}/beat", json={"payload": {"v": 2}, "priority": 7})
    assert patched.status_code == 200, patched.text
    # Not a change of timing: the next tick stays where it was.
    assert patched.json()["next_fire_at"] == first["next_fire_at"]
    await asyncio.sleep(1.1)
    assert await fire(scheduler) == 1
    payloads = await scheduler.fetch(
        "SELECT payload, priority FROM tasks WHERE schedule_name = 'beat' ORDER BY run_at"
    )
    assert [(row["payload"], row["priority"]) for row in payloads] == [({"v": 1}, 0), ({"v": 2}, 7)]

    # A new timing starts afresh from now; switching to cron drops the interval.
    retimed = (await client.patch(f"{URL}/beat", json={"cron": "0 0 1 1 *"})).json()
    assert retimed["interval_seconds"] is None and retimed["cron"] == "0 0 1 1 *"
    assert iso(retimed["next_fire_at"]).month == 1
    bad = await client.patch(f"{URL}/beat", json={"timezone": "Atlantis/Nowhere"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == ["body", "timezone"]
    assert (await client.patch(f"{URL}/missing", json={"priority": 1})).status_code == 404


async def test_pause_stops_ticks_and_resume_catches_up_by_policy(
    client: httpx.AsyncClient, scheduler: asyncpg.Connection
) -> None:
    for name, catch_up in (("skipper", "skip"), ("keeper", "all")):
        body = {"name": name, "type": "echo", "interval_seconds": 1, "catch_up": catch_up}
        assert (await client.post(URL, json=body)).status_code == 201
        paused = await client.post(f"{URL}/{name}/pause")
        assert paused.status_code == 200 and paused.json()["paused"] is True
    await asyncio.sleep(3.2)  # three ticks go by while paused
    assert await fire(scheduler) == 0
    assert await scheduler.fetchval("SELECT count(*) FROM tasks") == 0
    for name in ("skipper", "keeper"):
        resumed = await client.post(f"{URL}/{name}/resume")
        assert resumed.status_code == 200 and resumed.json()["paused"] is False
    await fire(scheduler)
    counts = dict(
        await scheduler.fetch("SELECT schedule_name, count(*) FROM tasks GROUP BY schedule_name")
    )
    assert counts["skipper"] == 1  # skip: one task now for the missed ticks
    assert counts["keeper"] >= 3  # all: one per missed tick


async def test_run_now_creates_one_extra_task_without_moving_the_schedule(
    client: httpx.AsyncClient, scheduler: asyncpg.Connection
) -> None:
    body = {"name": "daily", "type": "echo", "payload": {"d": 1}, "cron": "0 3 * * *"}
    before = (await client.post(URL, json=body)).json()
    ran = await client.post(f"{URL}/daily/run")
    assert ran.status_code == 201, ran.text
    task = ran.json()
    assert task["status"] == "NEW" and task["payload"] == {"d": 1} and task["type"] == "echo"
    assert ran.headers["location"] == f"/api/v1/tasks/{task['id']}"
    # The task goes through the outbox as any other.
    assert await scheduler.fetchval(
        "SELECT count(*) FROM outbox WHERE task_id = $1 AND kind = 'task.created'",
        uuid.UUID(task["id"]),
    )
    detail = (await client.get(f"{URL}/daily")).json()
    assert detail["next_fire_at"] == before["next_fire_at"]
    assert detail["last_ticks"][0]["task_id"] == task["id"]
    assert detail["last_ticks"][0]["fire_at"] is None
    assert (await client.post(f"{URL}/nope/run")).status_code == 404


async def test_code_schedules_are_listed_read_only_but_run_now(
    client: httpx.AsyncClient, scheduler: asyncpg.Connection
) -> None:
    declared = ScheduleDefinition("nightly", "echo", {"n": 1}, cron="0 2 * * *")
    await sync_code_schedules(scheduler, [declared], datetime.now(UTC))
    listed = (await client.get(URL)).json()["items"]
    assert [(s["name"], s["source"]) for s in listed] == [("nightly", "code")]
    for method, path, json in (
        ("PATCH", f"{URL}/nightly", {"priority": 1}),
        ("DELETE", f"{URL}/nightly", None),
        ("POST", f"{URL}/nightly/pause", None),
        ("POST", f"{URL}/nightly/resume", None),
    ):
        response = await client.request(method, path, json=json)
        assert response.status_code == 409, (method, path, response.text)
        assert "declared in code" in response.json()["detail"]
    assert (await client.post(f"{URL}/nightly/run")).status_code == 201
    # An API schedule cannot take a code schedule's name either.
    taken = await client.post(URL, json={"name": "nightly", "type": "echo", "cron": "* * * * *"})
    assert taken.status_code == 409


async def test_delete_stops_ticks_and_keeps_the_tasks(
    client: httpx.AsyncClient, scheduler: asyncpg.Connection
) -> None:
    body = {"name": "brief", "type": "echo", "interval_seconds": 1}
    assert (await client.post(URL, json=body)).status_code == 201
    await asyncio.sleep(1.1)
    assert await fire(scheduler) == 1
    assert (await client.delete(f"{URL}/brief")).status_code == 204
    assert (await client.delete(f"{URL}/brief")).status_code == 404
    await asyncio.sleep(1.1)
    assert await fire(scheduler) == 0
    assert await scheduler.fetchval("SELECT count(*) FROM tasks") == 1


async def test_the_schedule_routes_take_the_api_key(db_settings: DatabaseSettings) -> None:
    settings = ApiSettings(
        database_url=db_settings.database_url,
        outbox_channel=db_settings.outbox_channel,
        api_keys="k1",
    )
    async with app_client_for(settings) as client:
        refused = await client.get(URL)
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        allowed = await client.get(URL, headers={"Authorization": "Bearer k1"})
        assert allowed.status_code == 200
