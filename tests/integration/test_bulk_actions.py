"""Bulk cancel and retry (issue 18) over the API and the CLI, against the real Postgres.

Both go through db.actions: a filter, a walk in keyset chunks (one transaction each),
the single cancel's ``cancel_task()`` or the operator's replay for each task, and an
audit row in ``task_actions`` with who, why and the progress.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from taskbox.api.settings import ApiSettings
from taskbox.db import actions
from taskbox.db.replay import replayable
from taskbox.db.settings import DatabaseSettings
from taskbox.db.states import TaskStatus
from taskbox.db.tasks import NewTask, create_task
from tests.integration.conftest import app_client_for
from tests.integration.processes import CommandResult, run_command

KEY = "k-ops-bulk-51c2"
AUTH = {"Authorization": f"Bearer {KEY}"}
_FINISHED_AT = {"DONE", "FAILED", "CANCELLED"}


@pytest.fixture
async def ops(api_settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app whose keys are named: this one is ``ops``."""
    settings = ApiSettings(
        database_url=api_settings.database_url,
        outbox_channel=api_settings.outbox_channel,
        api_keys=f"ops:{KEY},ci:another-key-9d01",
    )
    async with app_client_for(settings) as client:
        client.headers.update(AUTH)
        yield client


@pytest.fixture
def cli_env(db_settings: DatabaseSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        {"DATABASE_URL": db_settings.database_url, "OUTBOX_CHANNEL": db_settings.outbox_channel}
    )
    return env


async def tasks_in(pool: asyncpg.Pool, type_: str, statuses: list[str]) -> list[uuid.UUID]:
    """One task of ``type_`` per status given, in that order (oldest first)."""
    made = []
    for status in statuses:
        async with pool.acquire() as conn, conn.transaction():
            row = await create_task(
                conn, NewTask(type=type_, payload={}, priority=0, max_attempts=3)
            )
            attempts = 0 if status in ("NEW", "PENDING") else 1
            await conn.execute(
                "UPDATE tasks SET status = $2, attempts = $3, finished_at = $4 WHERE id = $1",
                row["id"],
                status,
                attempts,
                datetime.now(UTC) if status in _FINISHED_AT else None,
            )
        made.append(row["id"])
    return made


async def state(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> list[tuple[str, bool]]:
    rows = await pool.fetch(
        "SELECT id, status, cancel_requested FROM tasks WHERE id = ANY($1::uuid[])", ids
    )
    by_id = {row["id"]: (row["status"], row["cancel_requested"]) for row in rows}
    return [by_id[task_id] for task_id in ids]


async def cli(env: dict[str, str], *args: str) -> CommandResult:
    return await run_command("relay", ["tasks", *args], env)


# ------------------------------------------------------------------------------ cancel


async def test_cancel_by_filter_over_the_api_with_a_dry_run_first(
    ops: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    chosen = await tasks_in(pool, "bulk-a", ["NEW", "PENDING", "PROCESSING", "DONE"])
    (other,) = await tasks_in(pool, "bulk-b", ["NEW"])
    before = await pool.fetch("SELECT * FROM tasks ORDER BY id")

    looked = await ops.post(
        "/api/v1/tasks/cancel", json={"type": "bulk-a", "reason": "drill", "dry_run": True}
    )
    assert looked.status_code == 200, looked.text
    dry = looked.json()
    assert (dry["matched"], dry["changed"], dry["skipped"]) == (4, 3, 1)
    assert (dry["dry_run"], dry["state"], dry["actor"]) == (True, "done", "ops")
    assert [uuid.UUID(t["id"]) for t in dry["sample"]] == chosen
    assert [t["status"] for t in dry["sample"]] == ["NEW", "PENDING", "PROCESSING", "DONE"]
    assert await pool.fetch("SELECT * FROM tasks ORDER BY id") == before  # nothing changed

    done = await ops.post("/api/v1/tasks/cancel", json={"type": "bulk-a", "reason": "drill"})
    assert done.status_code == 200, done.text
    action = done.json()
    assert (action["matched"], action["changed"], action["skipped"]) == (4, 3, 1)
    assert (action["state"], action["actor"], action["reason"]) == ("done", "ops", "drill")
    assert action["filter"] == {"type": "bulk-a"}
    assert action["sample"] is None and action["finished_at"] is not None
    # As the single cancel: waiting ones cancelled, the running one asked, DONE untouched.
    assert await state(pool, [*chosen, other]) == [
        ("CANCELLED", False),
        ("CANCELLED", False),
        ("PROCESSING", True),
        ("DONE", False),
        ("NEW", False),
    ]

    shown = await ops.get(f"/api/v1/task-actions/{action['id']}")
    assert shown.status_code == 200
    assert shown.json() == {k: v for k, v in action.items() if k != "sample"}
    listed = await ops.get("/api/v1/task-actions", params={"limit": 1})
    assert [item["id"] for item in listed.json()["items"]] == [action["id"]]  # newest first
    older = await ops.get("/api/v1/task-actions", params={"cursor": listed.json()["next_cursor"]})
    assert [item["id"] for item in older.json()["items"]] == [dry["id"]]
    assert older.json()["next_cursor"] is None
    assert (await ops.get("/api/v1/task-actions/999999")).status_code == 404


async def test_tiny_chunks_commit_one_by_one_with_the_same_result(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    statuses = ["NEW", "PENDING", "PROCESSING", "DONE", "FAILED"] * 2 + ["NEW"]
    chosen = await tasks_in(pool, "bulk-c", statuses)
    seen_from_outside: list[tuple[int, int]] = []

    async def progress(action: actions.TaskAction) -> None:
        # Read on another connection: only a committed chunk is visible there.
        row = await pool.fetchrow(
            "SELECT changed, skipped FROM task_actions WHERE id = $1", action.id
        )
        assert row is not None
        seen_from_outside.append((row["changed"], row["skipped"]))

    request = actions.BulkRequest(
        action="cancel",
        filter=actions.TaskFilter(type="bulk-c"),
        reason="chunks",
        actor="test",
        chunk_size=2,
    )
    async with pool.acquire() as conn:
        outcome = await actions.run(
            conn, request, outbox_channel=db_settings.outbox_channel, on_chunk=progress
        )
    # 11 tasks, 2 a chunk: six transactions, each committed before the next began.
    assert seen_from_outside == [(2, 0), (3, 1), (4, 2), (6, 2), (6, 4), (7, 4)]
    assert (outcome.action.matched, outcome.action.changed, outcome.action.skipped) == (11, 7, 4)
    assert [s for s, _ in await state(pool, chosen)] == [
        {"NEW": "CANCELLED", "PENDING": "CANCELLED"}.get(s, s) for s in statuses
    ]


async def test_a_chunk_that_loses_a_deadlock_runs_again_and_counts_once(
    pool: asyncpg.Pool, db_settings: DatabaseSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres rolls one side of a deadlock back (a consumer's claim may lock the same
    tasks in another order): the chunk changed nothing, so it runs again, and the action
    ends done with each task counted once, not failed half way."""
    chosen = await tasks_in(pool, "bulk-d", ["NEW"] * 4)
    real_apply = actions._apply
    calls = 0

    async def apply_losing_once(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        changed = await real_apply(*args, **kwargs)
        if calls == 2:  # the second chunk's first try: its changes roll back
            raise asyncpg.DeadlockDetectedError("deadlock detected")
        return changed

    monkeypatch.setattr(actions, "_apply", apply_losing_once)
    request = actions.BulkRequest(
        action="cancel",
        filter=actions.TaskFilter(type="bulk-d"),
        reason="deadlock",
        actor="test",
        chunk_size=2,
    )
    async with pool.acquire() as conn:
        outcome = await actions.run(conn, request, outbox_channel=db_settings.outbox_channel)
    assert calls == 3
    assert (outcome.action.state, outcome.action.matched, outcome.action.changed) == ("done", 4, 4)
    assert [s for s, _ in await state(pool, chosen)] == ["CANCELLED"] * 4


async def test_cancel_from_the_cli_prints_progress_per_chunk(
    pool: asyncpg.Pool, cli_env: dict[str, str]
) -> None:
    chosen = await tasks_in(pool, "bulk-d", ["NEW", "PENDING", "DONE", "PROCESSING", "NEW"])
    looked = await cli(cli_env, "cancel", "--type", "bulk-d", "--reason", "cli", "--dry-run")
    assert looked.code == 0, looked
    assert "selected 5, would cancel 4, would skip 1" in looked.stdout
    assert all(str(task_id) in looked.stdout for task_id in chosen)

    done = await cli(
        cli_env, "cancel", "--type", "bulk-d", "--reason", "cli drill", "--chunk-size", "2"
    )
    assert done.code == 0, done
    assert "changed 4, skipped 1" in done.stdout
    progress = [line for line in done.stderr.splitlines() if line.startswith("cancel #")]
    assert [line.split(": ")[1].split(",")[0] for line in progress] == ["2/5", "4/5", "5/5"]
    assert [s for s, _ in await state(pool, chosen)] == [
        "CANCELLED",
        "CANCELLED",
        "DONE",
        "PROCESSING",
        "CANCELLED",
    ]
    row = await pool.fetchrow("SELECT * FROM task_actions WHERE reason = 'cli drill'")
    assert row is not None
    assert "@" in row["actor"] and row["state"] == "done" and not row["dry_run"]


# ------------------------------------------------------------------------------- retry


async def _retry_outcome(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> list[tuple[Any, ...]]:
    rows = await pool.fetch(
        """
        SELECT t.id, t.status, t.attempts, t.max_attempts, t.finished_at IS NULL,
               (SELECT count(*) FROM outbox o WHERE o.task_id = t.id AND o.kind = 'task.replay')
                   AS replays
        FROM tasks t WHERE t.id = ANY($1::uuid[])
        """,
        ids,
    )
    by_id = {row["id"]: tuple(row)[1:] for row in rows}
    return [by_id[task_id] for task_id in ids]


async def test_retry_is_the_replay_and_the_cli_and_api_agree(
    ops: httpx.AsyncClient, pool: asyncpg.Pool, cli_env: dict[str, str]
) -> None:
    statuses = ["NEW", "PENDING", "PROCESSING", "DONE", "FAILED", "CANCELLED"]
    over_api = await tasks_in(pool, "bulk-api", statuses)
    over_cli = await tasks_in(pool, "bulk-cli", statuses)
    await pool.execute("UPDATE tasks SET max_attempts = 1 WHERE status = 'FAILED'")

    answer = await ops.post(
        "/api/v1/tasks/retry", json={"type": "bulk-api", "reason": "replay drill"}
    )
    assert answer.status_code == 200, answer.text
    assert (answer.json()["changed"], answer.json()["skipped"]) == (2, 4)
    ran = await cli(cli_env, "retry", "--type", "bulk-cli", "--reason", "replay drill")
    assert ran.code == 0, ran

    api_outcome = await _retry_outcome(pool, over_api)
    assert api_outcome == await _retry_outcome(pool, over_cli)
    # The replay: PENDING and FAILED back to NEW with a task.replay outbox row, the
    # attempt count kept and one more allowed; the others untouched.
    assert [row[0] for row in api_outcome] == [
        "NEW",
        "NEW",
        "PROCESSING",
        "DONE",
        "NEW",
        "CANCELLED",
    ]
    assert [row[-1] for row in api_outcome] == [0, 1, 0, 0, 1, 0]
    assert api_outcome[4][1:4] == (1, 2, True)
    headers = await pool.fetchval(
        "SELECT headers FROM outbox WHERE task_id = $1 AND kind = 'task.replay'", over_api[4]
    )
    assert (headers["who"], headers["why"]) == ("ops", "replay drill")
    assert headers["task_action"] == answer.json()["id"]

    forced = await ops.post(
        "/api/v1/tasks/retry", json={"ids": [str(over_api[3])], "reason": "rerun", "force": True}
    )
    assert forced.json()["changed"] == 1
    assert (await state(pool, [over_api[3]]))[0][0] == "NEW"


@pytest.mark.parametrize("force", [False, True])
async def test_replay_tasks_moves_exactly_the_replayable_statuses(
    pool: asyncpg.Pool, force: bool
) -> None:
    every = [status.value for status in TaskStatus]
    ids = await tasks_in(pool, "bulk-f", every)
    moved = await pool.fetch(
        "SELECT task_id FROM replay_tasks($1::uuid[], $2, '{}'::jsonb)", ids, force
    )
    expected = {ids[every.index(status.value)] for status in replayable(force)}
    assert {row["task_id"] for row in moved} == expected


# -------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("body", "where", "says"),
    [
        ({"type": "x"}, ["body", "reason"], "Field required"),
        ({"type": "x", "reason": "  "}, ["body", "reason"], "a reason is required"),
        ({"type": "x", "reason": "a\nb"}, ["body", "reason"], "one line of printable text"),
        ({"reason": "why"}, ["body"], '"all": true'),
        ({"reason": "why", "dry_run": True}, ["body"], "choose which tasks"),
        ({"status": ["DONE", "LOST"], "reason": "why"}, ["body", "status", 1], "NEW"),
        (
            {"ids": [str(uuid.uuid4()) for _ in range(actions.MAX_IDS + 1)], "reason": "why"},
            ["body", "ids"],
            f"at most {actions.MAX_IDS}",
        ),
        ({"queue": "Bad Name", "reason": "why"}, ["body", "queue"], "pattern"),
        (
            {
                "created_after": "2026-01-02T00:00:00Z",
                "created_before": "2026-01-01T00:00:00Z",
                "reason": "why",
            },
            ["body"],
            "earlier than created_before",
        ),
    ],
    ids=[
        "no-reason",
        "blank-reason",
        "two-line-reason",
        "empty-filter",
        "empty-dry-run",
        "bad-status",
        "too-many-ids",
        "bad-queue",
        "backwards-range",
    ],
)
async def test_bad_bulk_requests_are_422_saying_what(
    ops: httpx.AsyncClient, pool: asyncpg.Pool, body: dict[str, Any], where: list[Any], says: str
) -> None:
    for path in ("/api/v1/tasks/cancel", "/api/v1/tasks/retry"):
        answer = await ops.post(path, json=body)
        assert answer.status_code == 422, answer.text
        errors = answer.json()["errors"]
        assert errors[0]["loc"] == where, errors
        assert says in errors[0]["msg"], errors
    assert await pool.fetchval("SELECT count(*) FROM task_actions") == 0


async def test_all_selects_every_task_only_when_said(
    ops: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await tasks_in(pool, "bulk-g", ["NEW", "DONE"])
    answer = await ops.post(
        "/api/v1/tasks/cancel", json={"all": True, "reason": "look", "dry_run": True}
    )
    assert answer.status_code == 200, answer.text
    assert (answer.json()["matched"], answer.json()["changed"]) == (2, 1)
    assert answer.json()["filter"] == {"all": True}


async def test_the_listing_refuses_a_repeated_parameter(ops: httpx.AsyncClient) -> None:
    # Found by make fuzz: FastAPI took the last of limit=[...]&limit=15.0 and answered 200.
    answer = await ops.get("/api/v1/task-actions?limit=null&limit=15")
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["loc"] == ["query", "limit"]
    assert (await ops.get("/api/v1/task-actions?cursor=x")).status_code == 422
    assert (await ops.get("/api/v1/task-actions/0")).status_code == 422
    assert (await ops.get(f"/api/v1/task-actions/{2**63}")).status_code == 422
