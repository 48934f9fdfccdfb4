"""``python -m db roles`` against the real Postgres: each process's code runs under its role,
and what a role must not do fails with "permission denied".

Roles are cluster-wide, so every test makes its own (a random suffix) and drops them
afterwards; the grants live in the test's own database, which is dropped anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from taskbox.api.settings import ApiSettings
from taskbox.db import actions, execution, outbox, overview, queues, retention
from taskbox.db import replay as replay_store
from taskbox.db import webhooks as webhook_store
from taskbox.db.grants import FUNCTIONS, PROCESSES, TABLES, Process
from taskbox.db.outbox import PublishRefusal, claim_batch, notify, record_publish_outcome
from taskbox.db.pool import connect
from taskbox.db.roles import RolesError, apply_roles
from taskbox.db.schedules import (
    SCHEDULER_LOCK,
    ScheduleDefinition,
    create_schedule,
    delete_schedule,
    fire_due,
    get_schedule,
    list_schedules,
    recent_ticks,
    run_now,
    seconds_until_due,
    sync_code_schedules,
    update_schedule,
)
from taskbox.db.settings import DatabaseSettings
from taskbox.db.states import CANCEL_LATER, CANCEL_NOW, TaskStatus
from taskbox.db.tasks import (
    NewTask,
    TaskFilter,
    cancel_task,
    create_group,
    create_task,
    create_task_once,
    create_tasks,
    get_status,
    get_task,
    list_full_tasks,
    list_tasks,
)
from taskbox.relay.housekeeping import Housekeeper
from taskbox.relay.listener import OutboxListener
from taskbox.relay.metrics import RelayMetrics
from taskbox.relay.settings import RelaySettings
from taskbox.webhooks import new_secret
from tests.integration.conftest import app_client_for, poll_until_done
from tests.integration.processes import ServiceProcess, run_command

DAY = 86400.0


def as_role(dsn: str, role: str) -> str:
    """``dsn`` with ``role`` as its user (the local server trusts 127.0.0.1)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


@dataclass(frozen=True, slots=True)
class Roles:
    names: dict[Process, str]
    owner_dsn: str  # the database owner's: the test database's admin
    channel: str

    def dsn(self, process: Process) -> str:
        return as_role(self.owner_dsn, self.names[process])

    def settings(self, process: Process) -> DatabaseSettings:
        return DatabaseSettings(database_url=self.dsn(process), outbox_channel=self.channel)


@pytest.fixture
async def role_names(database_url: str) -> AsyncIterator[dict[Process, str]]:
    """Fresh role names; whatever roles carry them (and ``extra_roles``) go at teardown."""
    suffix = uuid.uuid4().hex[:10]
    names: dict[Process, str] = {p: f"tbx_{p}_{suffix}" for p in PROCESSES}
    yield names
    conn = await asyncpg.connect(database_url)
    try:
        for name in [*names.values(), f"tbx_owner_{suffix}"]:
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name):
                # DROP OWNED also takes back the grants here and CONNECT on the database;
                # what a test made a role own goes back to the admin first.
                await conn.execute(f'REASSIGN OWNED BY "{name}" TO CURRENT_USER')
                await conn.execute(f'DROP OWNED BY "{name}"')
                await conn.execute(f'DROP ROLE "{name}"')
    finally:
        await conn.close()


@pytest.fixture
async def roles(
    role_names: dict[Process, str], database_url: str, db_settings: DatabaseSettings
) -> Roles:
    conn = await asyncpg.connect(database_url)
    try:
        await apply_roles(conn, role_names)
    finally:
        await conn.close()
    return Roles(role_names, database_url, db_settings.outbox_channel)


@contextlib.asynccontextmanager
async def connected(roles: Roles, process: Process) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the processes open one (JSON codecs included), under the role."""
    conn = await connect(roles.settings(process))
    try:
        assert await conn.fetchval("SELECT current_user") == roles.names[process]
        yield conn
    finally:
        await conn.close()


async def refused(conn: asyncpg.Connection, statements: list[str]) -> list[str]:
    """The statements Postgres did NOT refuse with insufficient_privilege."""
    allowed = []
    for statement in statements:
        try:
            async with conn.transaction():
                await conn.execute(statement)
        except asyncpg.InsufficientPrivilegeError:
            continue
        allowed.append(statement)
    return allowed


def new_task(**payload: Any) -> NewTask:
    return NewTask(type="echo", payload=payload, priority=0, max_attempts=3)


async def make_tasks(owner: asyncpg.Connection, count: int) -> list[uuid.UUID]:
    return [(await create_task(owner, new_task(i=i)))["id"] for i in range(count)]


# What no process role may do: DDL, ownership, the migrations' bookkeeping.
NO_ROLE_MAY = [
    "CREATE TABLE scratch (i int)",
    "CREATE SCHEMA scratch",
    "CREATE INDEX ON tasks (type)",
    "ALTER TABLE tasks ADD COLUMN scratch int",
    "DROP TABLE outbox",
    "TRUNCATE tasks CASCADE",
    "SELECT * FROM alembic_version",
    "SELECT setval(pg_get_serial_sequence('outbox', 'id'), 1)",
    "CREATE ROLE scratch_role",
]

INSERT_TASK = "INSERT INTO tasks (type, payload) VALUES ('echo', '{}')"
INSERT_OUTBOX = (
    "INSERT INTO outbox (task_id, kind, body) VALUES (gen_random_uuid(), 'task.replay', '{}')"
)

MAY_NOT: dict[Process, list[str]] = {
    "api": [
        "DELETE FROM tasks",
        "UPDATE tasks SET result = '{}'",
        "UPDATE tasks SET error = '{}'",
        "UPDATE tasks SET payload = '{}'",
        "UPDATE tasks SET attempts = 0",
        "UPDATE tasks SET worker_id = 'me'",
        "UPDATE outbox SET published_at = now()",
        "DELETE FROM outbox",  # a cancel leaves the unsent row to the relay
        "SELECT headers FROM outbox",  # it only ever adds rows
        "UPDATE schedules SET source = 'api'",  # code schedules stay read-only
    ],
    "relay": [
        # it creates schedule ticks' tasks (db.tasks), but only born NEW and unclaimed
        "INSERT INTO tasks (type, payload, status) VALUES ('echo', '{}', 'DONE')",
        "INSERT INTO tasks (type, payload, idempotency_key) VALUES ('echo', '{}', 'k')",
        INSERT_OUTBOX,  # a replay's row: replay runs as the owner
        "INSERT INTO outbox (task_id, kind, body) VALUES (gen_random_uuid(), 'task.retry', '{}')",
        "UPDATE tasks SET result = '{}'",
        "UPDATE tasks SET payload = '{}'",
        "UPDATE tasks SET max_attempts = 9",
        "UPDATE outbox SET body = '{}'",
        "UPDATE schedules SET source = 'api'",
    ],
    "consumer": [
        "DELETE FROM tasks",
        "DELETE FROM outbox",
        INSERT_TASK,
        "UPDATE tasks SET payload = '{}'",
        "UPDATE tasks SET type = 'sleep'",
        "UPDATE tasks SET max_attempts = 9",
        "UPDATE outbox SET published_at = now()",
        INSERT_OUTBOX,
        "SELECT * FROM schedules",
    ],
}


@pytest.mark.parametrize("process", PROCESSES)
async def test_a_role_is_refused_what_its_process_never_does(
    roles: Roles, process: Process
) -> None:
    async with connected(roles, process) as conn:
        assert await refused(conn, MAY_NOT[process] + NO_ROLE_MAY) == []
        assert not await conn.fetchval("SELECT has_schema_privilege('public', 'CREATE')")
        assert not await conn.fetchval(
            "SELECT has_database_privilege(current_database(), 'CREATE')"
        )


# -- what README claims a compromised process cannot do, one test per claim -----------

FORGED_RESULT = '{"forged": true}'
FORGED_AUDIT = '{"who": "someone-else", "why": "forged"}'

# Every column of a task that its attempts, its outcome or the clock own: a create sets
# none of them, so a task can only be born NEW, unclaimed and unfinished.
NOT_SET_BY_A_CREATE = {
    "status": "'DONE'",
    "result": f"'{FORGED_RESULT}'",
    "error": "'{}'",
    "attempts": "1",
    "lease": "7",
    "worker_id": "'w1'",
    "started_at": "now()",
    "heartbeat_at": "now()",
    "finished_at": "now()",
    "cancel_requested": "true",
    "created_at": "now() - interval '30 days'",
    "updated_at": "now()",
}


async def owned_task(owner_dsn: str, status: TaskStatus, **columns: Any) -> uuid.UUID:
    """A task (with its task.created row) put in ``status`` by the owner."""
    owner = await connect(DatabaseSettings(database_url=owner_dsn))
    try:
        [task_id] = await make_tasks(owner, 1)
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=3))
        await owner.execute(
            f"UPDATE tasks SET status = $2{', ' + sets if sets else ''} WHERE id = $1",
            task_id,
            status.value,
            *columns.values(),
        )
    finally:
        await owner.close()
    return task_id


async def test_the_api_cannot_create_a_task_that_is_already_running_or_finished(
    roles: Roles,
) -> None:
    async with connected(roles, "api") as conn:
        forged = [
            f"INSERT INTO tasks (type, payload, {column}) VALUES ('echo', '{{}}', {value})"
            for column, value in NOT_SET_BY_A_CREATE.items()
        ]
        assert await refused(conn, forged) == []
        # What a create does set is still allowed, and the task is born NEW.
        born = await conn.fetchrow(
            "INSERT INTO tasks (id, type, payload, priority, max_attempts, run_at, "
            "idempotency_key, request_digest) VALUES (gen_random_uuid(), 'echo', '{}', 1, 2, "
            "now(), 'k', '\\x00') RETURNING status, attempts, result"
        )
        assert tuple(born) == ("NEW", 0, None)


async def test_the_api_changes_a_status_only_by_cancelling(roles: Roles, database_url: str) -> None:
    fresh = await owned_task(database_url, TaskStatus.NEW)
    done = await owned_task(
        database_url, TaskStatus.DONE, result={"ok": True}, finished_at=datetime.now(UTC)
    )
    async with connected(roles, "api") as conn:
        assert (
            await refused(
                conn,
                [
                    f"UPDATE tasks SET status = 'DONE', result = '{FORGED_RESULT}' "
                    f"WHERE id = '{fresh}'",
                    f"UPDATE tasks SET status = 'NEW' WHERE id = '{done}'",  # run it again
                    f"UPDATE tasks SET status = 'CANCELLED' WHERE id = '{done}'",
                    f"UPDATE tasks SET status = 'PROCESSING' WHERE id = '{fresh}'",
                    f"UPDATE tasks SET cancel_requested = true WHERE id = '{fresh}'",
                    f"UPDATE tasks SET finished_at = now() WHERE id = '{done}'",
                    "UPDATE tasks SET updated_at = now()",
                    # A row lock would hold off the relay and the consumers.
                    f"SELECT 1 FROM tasks WHERE id = '{fresh}' FOR UPDATE",
                ],
            )
            == []
        )
        # The cancel is the one change it may make, and only to a task not finished.
        finished = await cancel_task(conn, done)
        assert not finished.changed and finished.task is not None
        assert (finished.task["status"], finished.task["result"]) == ("DONE", {"ok": True})
        cancelled = await cancel_task(conn, fresh)
        assert cancelled.changed and cancelled.task is not None
        assert cancelled.task["status"] == "CANCELLED"


@pytest.mark.parametrize("status", list(TaskStatus))
async def test_the_api_cancels_as_the_state_machine_says(
    roles: Roles, database_url: str, status: TaskStatus
) -> None:
    task_id = await owned_task(database_url, status)
    async with connected(roles, "api") as conn:
        outcome = await cancel_task(conn, task_id)
        missing = await cancel_task(conn, uuid.uuid4())
    assert outcome.task is not None
    assert outcome.changed == (status in CANCEL_NOW | CANCEL_LATER)
    expected = TaskStatus.CANCELLED if status in CANCEL_NOW else status
    assert outcome.task["status"] == expected
    assert outcome.task["cancel_requested"] == (status in CANCEL_LATER)
    assert (outcome.task["finished_at"] is not None) == (status in CANCEL_NOW)
    assert (missing.task, missing.changed) == (None, False)


async def test_the_api_adds_only_task_created_outbox_rows(roles: Roles, database_url: str) -> None:
    task_id = await owned_task(database_url, TaskStatus.FAILED)
    columns = "task_id, kind, body, headers"
    async with connected(roles, "api") as conn:
        forged = [
            # A replay in someone else's name, or a retry the task never asked for.
            f"INSERT INTO outbox ({columns}) "
            f"VALUES ('{task_id}', 'task.replay', '{{}}', '{FORGED_AUDIT}')",
            f"INSERT INTO outbox ({columns}) VALUES ('{task_id}', 'task.retry', '{{}}', '{{}}')",
            # Bookkeeping that is the relay's, and an id that would jump the order.
            f"INSERT INTO outbox (task_id, kind, body, published_at) "
            f"VALUES ('{task_id}', 'task.created', '{{}}', now())",
            f"INSERT INTO outbox (task_id, kind, body, publish_attempts) "
            f"VALUES ('{task_id}', 'task.created', '{{}}', 5)",
            f"INSERT INTO outbox (task_id, kind, body, last_error) "
            f"VALUES ('{task_id}', 'task.created', '{{}}', 'x')",
            f"INSERT INTO outbox (task_id, kind, body, created_at) "
            f"VALUES ('{task_id}', 'task.created', '{{}}', now() - interval '30 days')",
            f"INSERT INTO outbox (id, task_id, kind, body) "
            f"VALUES (9000000000000000000, '{task_id}', 'task.created', '{{}}')",
        ]
        assert await refused(conn, forged) == []
    owner = await asyncpg.connect(database_url)
    try:
        kinds = await owner.fetch("SELECT kind FROM outbox WHERE task_id = $1", task_id)
    finally:
        await owner.close()
    assert [row["kind"] for row in kinds] == ["task.created"]


async def test_the_consumer_adds_only_task_retry_outbox_rows(
    roles: Roles, database_url: str
) -> None:
    task_id = await owned_task(database_url, TaskStatus.FAILED)
    columns = "task_id, kind, body, headers"
    async with connected(roles, "consumer") as conn:
        forged = [
            f"INSERT INTO outbox ({columns}) "
            f"VALUES ('{task_id}', 'task.replay', '{{}}', '{FORGED_AUDIT}')",
            f"INSERT INTO outbox ({columns}) VALUES ('{task_id}', 'task.created', '{{}}', '{{}}')",
            f"INSERT INTO outbox (task_id, kind, body, published_at) "
            f"VALUES ('{task_id}', 'task.retry', '{{}}', now())",
            f"INSERT INTO outbox (id, task_id, kind, body) "
            f"VALUES (9000000000000000000, '{task_id}', 'task.retry', '{{}}')",
        ]
        assert await refused(conn, forged) == []


@pytest.mark.parametrize("process", ["relay", "consumer"])
async def test_only_the_api_may_cancel(roles: Roles, database_url: str, process: Process) -> None:
    task_id = await owned_task(database_url, TaskStatus.PENDING)
    async with connected(roles, process) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await cancel_task(conn, task_id)
    owner = await asyncpg.connect(database_url)
    try:
        assert await owner.fetchval("SELECT status FROM tasks WHERE id = $1", task_id) == "PENDING"
    finally:
        await owner.close()


async def test_the_api_role_creates_reads_lists_and_cancels(
    roles: Roles, database_url: str
) -> None:
    async with connected(roles, "api") as conn:
        plain = await create_task(conn, new_task(n=1), {"traceparent": "00-ab-cd-01"})
        keyed, created = await create_task_once(conn, new_task(n=2), {}, "key-1")
        again, created_again = await create_task_once(conn, new_task(n=3), {}, "key-1")
        assert created and not created_again and again["id"] == keyed["id"]

        fetched = await get_task(conn, plain["id"])
        status = await get_status(conn, plain["id"])
        assert fetched is not None and fetched["payload"] == {"n": 1}
        assert status is not None and status["status"] == "NEW"
        page = await list_tasks(conn, TaskFilter(statuses=[TaskStatus.NEW]), limit=10)
        assert {row["id"] for row in page.rows} == {plain["id"], keyed["id"]}
        full = await list_full_tasks(conn, TaskFilter(statuses=[TaskStatus.NEW]), 10, None, 4096)
        assert [row["payload"] for row in full.rows] == [{"n": 2}, {"n": 1}]

        now = await cancel_task(conn, plain["id"])
        assert now.changed and now.task is not None and now.task["status"] == "CANCELLED"
        owner = await asyncpg.connect(database_url)
        try:
            await owner.execute("UPDATE tasks SET status = 'PROCESSING' WHERE id = $1", keyed["id"])
        finally:
            await owner.close()
        later = await cancel_task(conn, keyed["id"])
        assert later.task is not None and later.task["cancel_requested"] is True
        await notify(conn, roles.channel)

        # Batch, grouped and scheduled creates are inserts like any other.
        batch = await create_tasks(conn, [new_task(n=4), new_task(n=5)], {})
        assert [row["payload"] for row in batch] == [{"n": 4}, {"n": 5}]
        group = await create_group(conn, [(new_task(n=7), {"traceparent": "00-ef-01-01"})])
        assert [row["payload"] for row in group] == [{"n": 7}]
        scheduled = NewTask("echo", {"n": 6}, 0, 3, delay=60.0)
        assert (await create_task(conn, scheduled, {}))["run_at"] is not None
        routed = NewTask("echo", {"n": 8}, 0, 3, queue="media")
        assert (await create_task(conn, routed, {}))["queue"] == "media"

    owner = await asyncpg.connect(database_url)
    try:
        # Cancelling the NEW task left its outbox row for the relay to close unsent, and
        # every create wrote its task.created row.
        left = await owner.fetchval("SELECT count(*) FROM outbox WHERE task_id = $1", plain["id"])
        kinds = await owner.fetch("SELECT DISTINCT kind FROM outbox")
    finally:
        await owner.close()
    assert left == 1
    assert [row["kind"] for row in kinds] == ["task.created"]


async def test_a_column_added_later_leaves_creates_working_but_is_not_insertable(
    roles: Roles, database_url: str
) -> None:
    """INSERT is granted per column: a migration's new defaulted column breaks no create,
    and the api may write it only once db/grants.py names it and the command reruns."""
    owner = await asyncpg.connect(database_url)
    try:
        await owner.execute("ALTER TABLE tasks ADD COLUMN note text DEFAULT 'none'")
    finally:
        await owner.close()
    async with connected(roles, "api") as conn:
        created = await create_task(conn, new_task(n=1))
        assert await conn.fetchval("SELECT note FROM tasks WHERE id = $1", created["id"]) == "none"
        statement = "INSERT INTO tasks (type, payload, note) VALUES ('echo', '{}', 'later')"
        assert await refused(conn, [statement]) == []


async def test_the_relay_role_claims_records_sweeps_and_reports(
    roles: Roles, database_url: str
) -> None:
    owner = await connect(DatabaseSettings(database_url=database_url))
    try:
        ids = await make_tasks(owner, 3)
        async with connected(roles, "relay") as conn:
            async with conn.transaction():
                rows = (await claim_batch(conn, 10)).rows
                by_task = {row["task_id"]: row["id"] for row in rows}
                await record_publish_outcome(
                    conn,
                    [by_task[ids[0]], by_task[ids[1]]],
                    [PublishRefusal(by_task[ids[2]], "broker said no", 30.0)],
                )
            assert (await overview.backlog(conn)).rows == 1
            counts = await overview.task_counts(conn)
            assert counts == {"PENDING": 2, "NEW": 1}
            assert (await overview.backlog(conn)).failing == 1
            assert await overview.oldest_pending_age(conn) is not None
            assert (await overview.outbox_size(conn)).bytes > 0
            assert await overview.last_publish_error(conn) == "broker said no"
            assert await retention.try_lock(conn)
            await retention.unlock(conn)

        # Old enough for retention: two published rows, one of their tasks finished.
        await owner.execute(
            "UPDATE outbox SET created_at = now() - interval '8 days', "
            "published_at = now() - interval '8 days' WHERE published_at IS NOT NULL"
        )
        await owner.execute(
            "UPDATE tasks SET status = 'DONE', created_at = now() - interval '8 days', "
            "finished_at = now() - interval '8 days' WHERE id = $1",
            ids[1],
        )
    finally:
        await owner.close()
    settings = RelaySettings(
        database_url=roles.dsn("relay"),
        outbox_channel=roles.channel,
        outbox_retention=DAY,
        task_retention=DAY,
        retention_batch=10,
        _env_file=None,
    )
    report = await Housekeeper(settings, RelayMetrics()).sweep_if_free()
    assert report is not None
    assert (report.outbox_deleted, report.tasks_deleted) == (2, 1)


async def test_pausing_and_resuming_work_under_each_role(roles: Roles, database_url: str) -> None:
    """The api pauses and resumes (through the owner's functions), the relay's claim
    parks the paused queue's rows and its drain unparks them after the resume, the
    consumer reads the pauses; none of them may write a pause of its own."""
    owner = await connect(DatabaseSettings(database_url=database_url))
    try:
        ids = await make_tasks(owner, 2)
    finally:
        await owner.close()
    async with connected(roles, "api") as api:
        assert await queues.pause(api, "default", "ops", "roles test")
        assert [q.paused for q in await queues.list_queues(api)] == [True]
        assert await refused(api, ["INSERT INTO queue_pauses VALUES ('x', now(), 'a', 'b')"]) == []
    async with connected(roles, "consumer") as consumer:
        assert await queues.paused_queues(consumer) == {"default"}
        assert await refused(consumer, ["DELETE FROM queue_pauses"]) == []
    async with connected(roles, "relay") as relay:
        async with relay.transaction():
            claim = await claim_batch(relay, 10)
        assert (claim.parked, claim.rows) == (len(ids), [])
        assert (await overview.backlog(relay)).parked == len(ids)
        assert await refused(relay, ["DELETE FROM queue_pauses"]) == []
    async with connected(roles, "api") as api:
        assert await queues.resume(api, "default", "ops", "done", roles.channel) == len(ids)
        assert [e.action for e in await queues.events(api, "default")] == ["resume", "pause"]
    async with connected(roles, "relay") as relay:
        assert await outbox.resumed_queues(relay) == ["default"]
        assert await outbox.unpark(relay, "default", 10) == len(ids)
        async with relay.transaction():
            assert len((await claim_batch(relay, 10)).rows) == len(ids)


async def test_the_relay_role_listens_and_the_api_role_wakes_it(roles: Roles) -> None:
    wake = asyncio.Event()
    listener = OutboxListener(roles.settings("relay"), wake, check_interval=0.2)
    running = asyncio.create_task(listener.run())
    try:
        async with asyncio.timeout(10):
            await wake.wait()  # every (re)connect wakes the drain loop
            wake.clear()
            await asyncio.sleep(0.5)  # a couple of self-checks (NOTIFY to itself) pass
            assert listener.healthy and listener.reconnects == 0
            async with connected(roles, "api") as api:
                await notify(api, roles.channel)
            await wake.wait()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_the_relay_role_cannot_replay_which_runs_as_the_owner(
    roles: Roles, database_url: str
) -> None:
    owner = await connect(DatabaseSettings(database_url=database_url))
    try:
        [task_id] = await make_tasks(owner, 1)
        await owner.execute("UPDATE tasks SET status = 'FAILED' WHERE id = $1", task_id)
        async with connected(roles, "relay") as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await replay_store.replay_chunk(conn, [task_id], {}, force=False)
        result = await replay_store.replay_chunk(owner, [task_id], {}, force=False)
        assert list(result.replayed) == [task_id]
    finally:
        await owner.close()


async def test_the_api_role_runs_bulk_actions_and_no_other_role_may(
    roles: Roles, database_url: str
) -> None:
    """Bulk cancel and retry (db.actions) under the api role: the audit row and its
    progress by its grants, the tasks through cancel_task() and replay_tasks()."""
    owner = await connect(DatabaseSettings(database_url=database_url))
    try:
        waiting, failed = await make_tasks(owner, 2)
        await owner.execute("UPDATE tasks SET status = 'FAILED' WHERE id = $1", failed)
    finally:
        await owner.close()

    def bulk(action: actions.Action, task_id: uuid.UUID) -> actions.BulkRequest:
        chosen = actions.TaskFilter(ids=(task_id,))
        return actions.BulkRequest(action, chosen, "roles test", "ops", chunk_size=1)

    async with connected(roles, "api") as api:
        cancelled = await actions.run(api, bulk("cancel", waiting), outbox_channel=roles.channel)
        retried = await actions.run(api, bulk("retry", failed), outbox_channel=roles.channel)
        assert (cancelled.action.changed, retried.action.changed) == (1, 1)
        assert [a.state for a in await actions.list_page(api, 10)] == ["done", "done"]
        assert (
            await refused(api, ["DELETE FROM task_actions", "UPDATE task_actions SET actor = 'x'"])
            == []
        )
    for process in ("relay", "consumer"):
        async with connected(roles, process) as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await actions.run(conn, bulk("cancel", waiting), outbox_channel=roles.channel)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("SELECT * FROM replay_tasks($1::uuid[], true, '{}')", [failed])


async def test_the_consumer_role_claims_heartbeats_finishes_rescues_and_requeues(
    roles: Roles, database_url: str
) -> None:
    owner = await connect(DatabaseSettings(database_url=database_url))
    try:
        done, retried = await make_tasks(owner, 2)

        async def delivery(task_id: uuid.UUID) -> execution.Delivery:
            newest = await owner.fetchval("SELECT max(id) FROM outbox WHERE task_id = $1", task_id)
            return execution.Delivery(task_id, newest)

        async with connected(roles, "consumer") as conn:
            claimed = await execution.claim_tasks(
                conn,
                [
                    await delivery(done),
                    await delivery(retried),
                    execution.Delivery(uuid.uuid4(), 1),
                ],
                "w1",
                30,
            )
            assert sum(row["claimed"] for row in claimed) == 2
            lease = {row["id"]: row["lease"] for row in claimed if row["claimed"]}
            assert await execution.heartbeat(conn, list(lease.items()), "w1") == {
                done: False,
                retried: False,
            }
            finished = await execution.finish_tasks(
                conn,
                [
                    execution.Outcome(done, 1, "DONE", result={"ok": True}, lease=lease[done]),
                    execution.Outcome(
                        retried,
                        1,
                        "NEW",
                        error={"type": "E", "message": "m"},
                        retry_in=0.0,
                        lease=lease[retried],
                    ),
                ],
                "w1",
            )
            assert finished == {done: "DONE", retried: "NEW"}

            [again] = await execution.claim_tasks(conn, [await delivery(retried)], "w2", 30)
            assert again["claimed"]
            await owner.execute(
                "UPDATE tasks SET heartbeat_at = now() - interval '1 hour' WHERE id = $1", retried
            )
            rescued = await execution.rescue_stale(conn, 60)
            assert [(row["id"], row["status"]) for row in rescued] == [(retried, "NEW")]
            await notify(conn, roles.channel)

            # The broker dead-lettered the message of the rescued task's newest row after
            # the relay had made it PENDING: the watch sends it again.
            await owner.execute("UPDATE tasks SET status = 'PENDING' WHERE id = $1", retried)
            dead = await delivery(retried)
            decision = await execution.requeue_dead_lettered(conn, dead)
            assert decision.outbox_id is not None and decision.outbox_id > dead.outbox_id
            assert decision.status == "PENDING"  # as found
        assert await owner.fetchval("SELECT status FROM tasks WHERE id = $1", retried) == "NEW"
        assert await owner.fetchval("SELECT result FROM tasks WHERE id = $1", done) == {"ok": True}
        kinds = await owner.fetch("SELECT kind FROM outbox WHERE task_id = $1 ORDER BY id", retried)
        assert [row["kind"] for row in kinds] == [
            "task.created",
            "task.retry",
            "task.retry",
            "task.retry",
        ]
    finally:
        await owner.close()


# -- reruns and the command ----------------------------------------------------------

_PRIVILEGES = """
SELECT 'table ' || c.relname, a.grantee::regrole::text, a.privilege_type
FROM pg_class AS c, aclexplode(c.relacl) AS a
WHERE c.relnamespace = 'public'::regnamespace AND a.grantee::regrole::text = ANY($1::text[])
UNION ALL
SELECT 'column ' || c.relname || '.' || t.attname, a.grantee::regrole::text, a.privilege_type
FROM pg_attribute AS t JOIN pg_class AS c ON c.oid = t.attrelid, aclexplode(t.attacl) AS a
WHERE c.relnamespace = 'public'::regnamespace AND a.grantee::regrole::text = ANY($1::text[])
UNION ALL
SELECT 'schema ' || n.nspname, a.grantee::regrole::text, a.privilege_type
FROM pg_namespace AS n, aclexplode(n.nspacl) AS a
WHERE a.grantee::regrole::text = ANY($1::text[])
UNION ALL
SELECT 'database', a.grantee::regrole::text, a.privilege_type
FROM pg_database AS d, aclexplode(d.datacl) AS a
WHERE d.datname = current_database() AND a.grantee::regrole::text = ANY($1::text[])
UNION ALL
SELECT 'attributes', rolname, concat_ws(' ', rolsuper, rolcreatedb, rolcreaterole, rolcanlogin,
                                        rolreplication, rolbypassrls)
FROM pg_roles WHERE rolname = ANY($1::text[])
UNION ALL
SELECT 'member of ' || m.roleid::regrole::text, m.member::regrole::text, ''
FROM pg_auth_members AS m WHERE m.member::regrole::text = ANY($1::text[])
UNION ALL
SELECT 'function ' || p.oid::regprocedure::text,
       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
       a.privilege_type
FROM pg_proc AS p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) AS a
WHERE p.pronamespace = 'public'::regnamespace
  AND (a.grantee = 0 OR a.grantee::regrole::text = ANY($1::text[]))
UNION ALL
SELECT 'row security ' || c.relname, '', c.relrowsecurity::text
FROM pg_class AS c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
UNION ALL
SELECT 'policy ' || tablename || '.' || policyname, array_to_string(roles, ','),
       concat_ws(' ', permissive, cmd, qual, with_check)
FROM pg_policies WHERE schemaname = 'public'
ORDER BY 1, 2, 3
"""


async def privileges(conn: asyncpg.Connection, roles: Roles) -> list[tuple[str, str, str]]:
    return [tuple(row) for row in await conn.fetch(_PRIVILEGES, list(roles.names.values()))]


async def test_a_rerun_changes_nothing_and_takes_back_what_was_added(
    roles: Roles, database_url: str
) -> None:
    api, relay, consumer = (roles.names[p] for p in PROCESSES)
    conn = await asyncpg.connect(database_url)
    try:
        database = await conn.fetchval("SELECT current_database()")
        granted = await privileges(conn, roles)
        assert ("column tasks.type", api, "INSERT") in granted
        assert ("column tasks.status", api, "INSERT") not in granted
        # The api changes tasks only by cancel_task() (schedules are its own to edit)
        assert not [
            p
            for p in granted
            if p[1] == api
            and p[2] in ("UPDATE", "DELETE")
            and p[0].split()[-1].split(".")[0] in ("tasks", "outbox")
        ]
        assert ("table tasks", api, "INSERT") not in granted
        assert ("function cancel_task(uuid)", api, "EXECUTE") in granted
        assert not [p for p in granted if p[0].startswith("function") and p[1] != api]
        assert ("row security outbox", "", "true") in granted
        assert ("column tasks.result", consumer, "UPDATE") in granted
        assert not [
            p for p in granted if p[0] == "table tasks" and p[2] == "DELETE" and p[1] != relay
        ]

        # Nothing to change, so no policy is made again (which would lock the outbox).
        again = await apply_roles(conn, roles.names)
        assert await privileges(conn, roles) == granted
        assert not [step for step in again.steps if "POLICY" in step.sql or "ROW LEVEL" in step.sql]

        for extra in (
            f"GRANT ALL ON tasks, outbox, alembic_version TO {api}",
            f"GRANT UPDATE ON outbox TO {consumer}",
            f"GRANT CREATE ON SCHEMA public TO {relay}",
            f"GRANT CREATE, TEMPORARY ON DATABASE {database} TO {relay}",
            f"GRANT UPDATE ON SEQUENCE outbox_id_seq TO {consumer}",
            f"ALTER ROLE {api} CREATEDB NOLOGIN",
            f"GRANT pg_read_all_data TO {consumer}",
            f"GRANT EXECUTE ON FUNCTION cancel_task(uuid) TO {consumer}",
            "GRANT EXECUTE ON FUNCTION cancel_task(uuid) TO PUBLIC",
            "ALTER TABLE outbox DISABLE ROW LEVEL SECURITY",
            "DROP POLICY taskbox_api_inserts ON outbox",
            "ALTER POLICY taskbox_consumer_inserts ON outbox WITH CHECK (kind <> '')",
            f"CREATE POLICY taskbox_stray ON outbox AS RESTRICTIVE FOR DELETE TO {relay} "
            "USING (false)",
        ):
            await conn.execute(extra)
        assert await privileges(conn, roles) != granted
        plan = await apply_roles(conn, roles.names)
        assert plan.public_revoked == ["EXECUTE on function cancel_task(uuid)"]
        assert await privileges(conn, roles) == granted
    finally:
        await conn.close()


async def test_a_permissive_policy_added_later_does_not_widen_what_a_role_may_insert(
    roles: Roles, database_url: str
) -> None:
    task_id = await owned_task(database_url, TaskStatus.FAILED)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            f"CREATE POLICY anything ON outbox FOR INSERT TO {roles.names['api']} WITH CHECK (true)"
        )
    finally:
        await conn.close()
    async with connected(roles, "api") as api:
        forged = (
            "INSERT INTO outbox (task_id, kind, body, headers) "
            f"VALUES ('{task_id}', 'task.replay', '{{}}', '{FORGED_AUDIT}')"
        )
        assert await refused(api, [forged]) == []


async def test_a_policy_change_waits_for_the_outbox_lock_only_so_long(
    role_names: dict[Process, str], database_url: str
) -> None:
    """Making the policies locks the outbox: behind a long transaction the command gives
    up (changing nothing) instead of stalling every process; a rerun that finds them in
    place needs no such lock."""
    reader = await asyncpg.connect(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        async with reader.transaction():
            await reader.execute("LOCK TABLE outbox IN ACCESS SHARE MODE")  # any reader
            with pytest.raises(asyncpg.LockNotAvailableError):
                await apply_roles(conn, role_names, lock_timeout="200ms")
            made = await conn.fetchval(
                "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[])",
                list(role_names.values()),
            )
            assert made == 0
        await apply_roles(conn, role_names)
        async with reader.transaction():
            await reader.execute("LOCK TABLE outbox, tasks IN ROW EXCLUSIVE MODE")  # writers
            await apply_roles(conn, role_names, lock_timeout="200ms")
    finally:
        await conn.close()
        await reader.close()


async def test_create_on_schema_public_granted_to_public_is_revoked(
    role_names: dict[Process, str], database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")  # as before PG15
        plan = await apply_roles(conn, role_names)
        assert plan.public_revoked == ["CREATE on schema public"]
        for name in role_names.values():
            assert not await conn.fetchval(
                "SELECT has_schema_privilege($1, 'public', 'CREATE')", name
            )
    finally:
        await conn.close()


async def test_the_checks_refuse_before_changing_anything(
    role_names: dict[Process, str], database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(RolesError, match="three different role names"):
            await apply_roles(conn, {**role_names, "relay": role_names["api"]})
        with pytest.raises(RolesError, match="is a superuser"):
            await apply_roles(conn, {**role_names, "api": "root"})
        with pytest.raises(RolesError, match="role name 'Bad-Name'"):
            await apply_roles(conn, {**role_names, "api": "Bad-Name"})

        owner = role_names["api"].replace("tbx_api_", "tbx_owner_")
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"CREATE ROLE {owner} LOGIN")
        for table in TABLES:
            await conn.execute(f"ALTER TABLE {table} OWNER TO {owner}")
        owner_conn = await asyncpg.connect(as_role(database_url, owner))
        try:
            # Owning the tables is not enough: CONNECT needs the database's owner.
            with pytest.raises(RolesError, match="must run as the database owner"):
                await apply_roles(owner_conn, role_names)
            await conn.execute(f'ALTER DATABASE "{database}" OWNER TO {owner}')
            with pytest.raises(RolesError, match="may create roles"):
                await apply_roles(owner_conn, role_names)
            # Granting EXECUTE on the cancel function needs its owner too.
            await conn.execute(f"ALTER ROLE {owner} CREATEROLE")
            with pytest.raises(RolesError, match=r"owner of function\(s\) cancel_task\(uuid\)"):
                await apply_roles(owner_conn, role_names)
        finally:
            await owner_conn.close()
        with pytest.raises(RolesError, match=f"role {owner} owns objects"):
            await apply_roles(conn, {**role_names, "api": owner})

        await conn.execute("DROP FUNCTION cancel_task(uuid)")
        with pytest.raises(RolesError, match=r"cancel_task\(uuid\) missing .* migrate first"):
            await apply_roles(conn, role_names)
        await conn.execute("DROP TABLE outbox")
        with pytest.raises(RolesError, match="run python -m db migrate first"):
            await apply_roles(conn, role_names)
        created = await conn.fetchval(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[])",
            list(role_names.values()),
        )
        assert created == 0
    finally:
        await conn.close()


async def test_an_owner_with_createrole_needs_no_superuser(
    role_names: dict[Process, str], database_url: str, db_settings: DatabaseSettings
) -> None:
    """The usual production set-up: the migrating role owns the database and the tables
    and may create roles, nothing more."""
    owner = role_names["api"].replace("tbx_api_", "tbx_owner_")
    conn = await asyncpg.connect(database_url)
    try:
        database = await conn.fetchval("SELECT current_database()")
        await conn.execute(f"CREATE ROLE {owner} LOGIN CREATEROLE")
        for table in (*TABLES, "alembic_version"):
            await conn.execute(f"ALTER TABLE {table} OWNER TO {owner}")
        # every function the migrations made (those granted to roles, and the trigger
        # function of migration 0009 that none is granted)
        functions = await conn.fetch(
            "SELECT p.oid::regprocedure::text AS signature FROM pg_proc AS p"
            " JOIN pg_namespace AS n ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
        )
        assert {f.replace(" ", "") for p in PROCESSES for f in FUNCTIONS[p]} <= {
            row["signature"] for row in functions
        }
        for row in functions:
            await conn.execute(f"ALTER FUNCTION {row['signature']} OWNER TO {owner}")
        await conn.execute(f'ALTER DATABASE "{database}" OWNER TO {owner}')
    finally:
        await conn.close()
    owner_conn = await asyncpg.connect(as_role(database_url, owner))
    try:
        first = await apply_roles(owner_conn, role_names)
        again = await apply_roles(owner_conn, role_names)
    finally:
        await owner_conn.close()
    assert [o.created for o in first.outcomes] == [True, True, True]
    assert [o.created for o in again.outcomes] == [False, False, False]
    roles = Roles(role_names, database_url, db_settings.outbox_channel)
    async with connected(roles, "api") as api:
        created = await create_task(api, new_task(by="api"))
        assert (await cancel_task(api, created["id"])).changed
    async with connected(roles, "consumer") as consumer:
        assert await refused(consumer, MAY_NOT["consumer"] + NO_ROLE_MAY) == []


def command_env(database_url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": database_url, **extra}


def name_args(names: dict[Process, str]) -> list[str]:
    return [arg for p in PROCESSES for arg in (f"--{p}-role", names[p])]


async def test_the_command_creates_then_updates_and_sets_passwords(
    role_names: dict[Process, str], database_url: str
) -> None:
    args = ["roles", *name_args(role_names)]
    dry = await run_command("db", [*args, "--dry-run"], command_env(database_url))
    assert dry.code == 0, dry
    assert f'CREATE ROLE "{role_names["api"]}" WITH LOGIN;' in dry.stdout

    env = command_env(database_url, TASKBOX_API_PASSWORD="s3cret'pass")
    first = await run_command("db", args, env)
    assert first.code == 0, first
    assert f"{role_names['api']} (api): created, password set from TASKBOX_API_PASSWORD" in (
        first.stdout
    )
    assert "s3cret" not in first.stdout + first.stderr
    second = await run_command("db", args, command_env(database_url))
    assert second.code == 0, second
    assert f"{role_names['relay']} (relay): updated, password unchanged" in second.stdout

    conn = await asyncpg.connect(database_url)
    try:
        passwords = await conn.fetch(
            "SELECT rolname, rolpassword IS NOT NULL AS set FROM pg_authid "
            "WHERE rolname = ANY($1::text[])",
            list(role_names.values()),
        )
    finally:
        await conn.close()
    assert {row["rolname"]: row["set"] for row in passwords} == {
        role_names["api"]: True,
        role_names["relay"]: False,
        role_names["consumer"]: False,
    }


async def test_the_command_advises_keeping_the_roles_out_of_other_databases(
    role_names: dict[Process, str], database_url: str, template_database: str
) -> None:
    """It changes nothing outside its database, but says which REVOKE CONNECT would keep
    its roles there: from PUBLIC on the other databases (the session's template is one),
    here as well, and from a role granted CONNECT elsewhere by name."""
    args = ["roles", *name_args(role_names)]
    conn = await asyncpg.connect(database_url)
    try:
        database = await conn.fetchval("SELECT current_database()")
        dry = await run_command("db", [*args, "--dry-run"], command_env(database_url))
        assert dry.code == 0, dry
        assert f'--     REVOKE CONNECT ON DATABASE "{template_database}" FROM PUBLIC;' in dry.stdout

        first = await run_command("db", args, command_env(database_url))
        assert first.code == 0, first
        assert "a leaked password would reach beyond Taskbox" in first.stdout
        assert f'    REVOKE CONNECT ON DATABASE "{template_database}" FROM PUBLIC;' in first.stdout
        assert f'    REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC;' in first.stdout
        assert await conn.fetchval(
            "SELECT has_database_privilege('public', $1, 'CONNECT')", template_database
        ), "the command itself leaves other databases alone"

        # Done as advised here; and a grant by name elsewhere is advised away.
        api = role_names["api"]
        await conn.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC')
        await conn.execute(f'GRANT CONNECT ON DATABASE "{template_database}" TO {api}')
        try:
            second = await run_command("db", args, command_env(database_url))
        finally:
            await conn.execute(f'REVOKE CONNECT ON DATABASE "{template_database}" FROM {api}')
        assert second.code == 0, second
        assert f'REVOKE CONNECT ON DATABASE "{database}"' not in second.stdout
        assert f'REVOKE CONNECT ON DATABASE "{template_database}" FROM "{api}";' in second.stdout
    finally:
        await conn.close()
    # The roles still connect here on CONNECT of their own.
    roles = Roles(role_names, database_url, "unused")
    for process in PROCESSES:
        async with connected(roles, process) as conn:
            assert await conn.fetchval("SELECT 1") == 1


async def test_the_command_explains_what_to_fix_and_exits_2(
    roles: Roles, unreachable_database_url: str
) -> None:
    args = ["roles", *name_args(roles.names)]
    as_api = await run_command("db", args, command_env(roles.dsn("api")))
    assert as_api.code == 2, as_api
    assert "must run as the database owner" in as_api.stderr
    away = await run_command("db", args, command_env(unreachable_database_url))
    assert away.code == 2, away
    assert "cannot reach Postgres at DATABASE_URL" in away.stderr
    missing = roles.owner_dsn.rsplit("/", 1)[0] + "/taskbox_no_such_db"
    no_db = await run_command("db", args, command_env(missing))
    assert no_db.code == 2, no_db
    assert "run python -m db migrate first" in no_db.stderr


# -- end to end ----------------------------------------------------------------------


async def test_api_relay_and_consumer_run_a_task_under_their_roles(
    roles: Roles, service_env: dict[str, str]
) -> None:
    """The real api app, relay and consumer, each connected as its own role."""
    relay = ServiceProcess(
        "relay",
        service_env,
        DATABASE_URL=roles.dsn("relay"),
        RELAY_POLL_INTERVAL="0.2",
        RETENTION_INTERVAL="0.5",
    )
    consumer = ServiceProcess("consumer", service_env, DATABASE_URL=roles.dsn("consumer"))
    api_settings = ApiSettings(
        database_url=roles.dsn("api"), outbox_channel=roles.channel, _env_file=None
    )
    await relay.start()
    await consumer.start()
    try:
        client: httpx.AsyncClient
        async with app_client_for(api_settings) as client:
            created = await client.post(
                "/api/v1/tasks", json={"type": "sha256", "payload": {"text": "roles"}}
            )
            assert created.status_code == 201, created.text
            location = created.headers["location"]
            task = await poll_until_done(client, location, within=10)
            assert task["result"] == {"sha256": hashlib.sha256(b"roles").hexdigest()}
            listed = await client.get("/api/v1/tasks", params={"status": "DONE"})
            assert [t["id"] for t in listed.json()["items"]] == [task["id"]]
            cancelled = await client.delete(f"/api/v1/tasks/{task['id']}")
            assert cancelled.status_code == 409, cancelled.text  # DONE is final
            assert (await client.get("/readyz")).status_code == 200
            # the consumers seen, which the consumer role recorded and the api role reads
            queues = await client.get("/api/v1/queues")
            assert queues.status_code == 200, queues.text
            (default,) = queues.json()["items"]
            assert (default["name"], default["consumers"]) == ("default", 1), default

        relay_env = {**service_env, "DATABASE_URL": roles.dsn("relay")}
        for command in ("status", "cleanup"):
            ran = await run_command("relay", [command], relay_env)
            assert ran.code == 0, ran
    finally:
        assert await consumer.stop(signal.SIGTERM) == 0, consumer.output
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
    for proc in (relay, consumer):
        assert "permission denied" not in proc.output, proc.output


async def test_the_relay_role_schedules_and_the_api_role_manages_schedules(
    roles: Roles, database_url: str
) -> None:
    now = datetime.now(UTC)
    code = ScheduleDefinition("nightly", "echo", {"n": 1}, cron="0 3 * * *")
    api_made = ScheduleDefinition("every-second", "echo", {}, interval_seconds=1.0, catch_up="all")
    async with connected(roles, "relay") as relay:
        assert await relay.fetchval("SELECT pg_try_advisory_lock($1)", SCHEDULER_LOCK)
        sync = await sync_code_schedules(relay, [code], now)
        assert sync.removed == [] and sync.clashes == []
        async with connected(roles, "api") as api:
            assert await create_schedule(api, api_made, now - timedelta(seconds=5)) is not None
            assert await update_schedule(api, replace(api_made, priority=3), now) is not None
            row = await get_schedule(api, "every-second")
            assert row is not None
            await run_now(api, row)
            assert len(await list_schedules(api)) == 2
        report = await fire_due(relay, catch_up_max=10)
        assert len(report.created) in (4, 5)  # made 5 s back: each second since, every one
        assert await seconds_until_due(relay) is not None
        async with connected(roles, "api") as api:
            assert len(await recent_ticks(api, "every-second", 10)) >= 2
            assert await delete_schedule(api, "every-second")
        assert (await sync_code_schedules(relay, [], now)).removed == ["nightly"]


async def test_webhooks_under_each_role(roles: Roles, database_url: str) -> None:
    """The api role manages subscriptions and replays, the consumer role's outcome
    enqueues deliveries through the trigger (which runs as the owner: the consumer has
    no right on the webhook tables), the relay role claims and settles them."""
    owner = await connect(DatabaseSettings(database_url=database_url))
    try:
        (task_id,) = await make_tasks(owner, 1)
        async with connected(roles, "api") as api:
            hook = await webhook_store.create_webhook(
                api, webhook_store.Subscription("http://127.0.0.1:9/", ["task.done"]), new_secret()
            )
            assert await webhook_store.update_webhook(api, hook["id"], {"enabled": True})
            assert await webhook_store.rotate_secret(api, hook["id"], new_secret(), 60)
            assert len(await webhook_store.list_webhooks(api)) == 1
        async with connected(roles, "consumer") as consumer:
            # the finish's UPDATE, as the consumer writes it
            await consumer.execute("UPDATE tasks SET status = 'DONE' WHERE id = $1", task_id)
            assert (
                await refused(
                    consumer,
                    [
                        "SELECT * FROM webhooks",
                        "SELECT * FROM webhook_deliveries",
                        "INSERT INTO webhook_deliveries (url, task_id, event, body)"
                        " VALUES ('http://x/', gen_random_uuid(), 'task.done', '{}')",
                    ],
                )
                == []
            )
        async with connected(roles, "relay") as relay:
            (claimed,) = await webhook_store.claim_due(relay, 10, 15.0, 8)
            assert claimed["webhook_id"] == hook["id"] and claimed["secret"].startswith("whsec_")
            record = webhook_store.AttemptRecord(
                claimed["id"], 1, 500, 1.5, "answered 500", "no", False, None
            )
            assert await webhook_store.record_attempt(relay, record) == "failed"
            assert await webhook_store.pending_backlog(relay) == 0
            assert (
                await refused(
                    relay,
                    [
                        "UPDATE webhooks SET url = 'http://x/'",
                        "UPDATE webhook_deliveries SET body = '{}'",
                        "DELETE FROM webhook_deliveries",
                    ],
                )
                == []
            )
        async with connected(roles, "api") as api:
            assert await webhook_store.replay_delivery(api, claimed["id"]) is not None
            found = await webhook_store.get_delivery(api, claimed["id"])
            assert found is not None and len(found[1]) == 1
            assert len(await webhook_store.list_deliveries(api, hook["id"], None, 10)) == 1
            assert await webhook_store.replay_failed(api, hook["id"]) == 0
            assert (
                await refused(
                    api,
                    [
                        "INSERT INTO webhook_deliveries (url, task_id, event, body)"
                        " VALUES ('http://x/', gen_random_uuid(), 'task.done', '{}')",
                        "UPDATE webhook_deliveries SET body = '{}'",
                        "INSERT INTO webhook_attempts (delivery_id, attempt, latency_ms)"
                        " VALUES (gen_random_uuid(), 1, 1)",
                    ],
                )
                == []
            )
            assert await webhook_store.delete_webhook(api, hook["id"])
    finally:
        await owner.close()
