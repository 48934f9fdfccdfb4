"""Invariants of the transactional outbox, each pinned so that the mutation which breaks
it turns a test red:

1. A task and its ``task.created`` outbox row are written by one transaction, on every
   create path (db.tasks and the HTTP api): rows of one transaction share its ``xmin``,
   and an outbox insert that fails leaves no task behind.
2. Retention never deletes an unpublished outbox row, however old, wherever it lies in
   id order among published ones.
3. The relay's claim skips rows another claim holds (FOR UPDATE SKIP LOCKED): a second
   relay gets other rows at once instead of queueing behind the first's batch.

Every create here goes through the pool, as the api's does: no transaction of the
test's own wraps it, so each statement commits on its own and a create split into two
statements would show up as two transactions.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import httpx
import pytest

from taskbox.db import outbox
from taskbox.db.tasks import NewTask, create_group, create_task, create_task_once, create_tasks
from taskbox.relay.housekeeping import sweep
from taskbox.relay.settings import RelaySettings
from taskbox.runtime import tracing

TASKS = "/api/v1/tasks"
BATCH = "/api/v1/tasks/batch"
DAY = 86400.0

# Each task and its task.created row, with the transaction ids that wrote them.
_TASKS_AND_EVENTS = """
SELECT t.id, t.xmin::text AS task_xid, o.xmin::text AS event_xid, o.kind
FROM tasks AS t LEFT JOIN outbox AS o ON o.task_id = t.id
ORDER BY t.id, o.id
"""


def task(n: int, priority: int = 0) -> NewTask:
    return NewTask(type="echo", payload={"n": n}, priority=priority, max_attempts=3)


async def written_together(pool: asyncpg.Pool) -> dict[uuid.UUID, str]:
    """Every task with exactly one outbox row, a task.created written by the task's own
    transaction; returns each task's transaction id."""
    rows = await pool.fetch(_TASKS_AND_EVENTS)
    xids: dict[uuid.UUID, str] = {}
    for row in rows:
        assert row["id"] not in xids, f"task {row['id']} has more than one outbox row"
        assert row["kind"] == "task.created", f"task {row['id']} has no task.created row"
        assert row["event_xid"] == row["task_xid"], (
            f"task {row['id']} was committed by transaction {row['task_xid']} but its "
            f"outbox row by {row['event_xid']}: the two are not atomic"
        )
        xids[row["id"]] = row["task_xid"]
    return xids


async def task_count(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM tasks"))


# Each create path of db.tasks, as the api calls it (on the pool); returns the new ids.
Create = Callable[[asyncpg.Pool, list[NewTask]], Awaitable[list[uuid.UUID]]]


async def _one_by_one(pool: asyncpg.Pool, tasks: list[NewTask]) -> list[uuid.UUID]:
    return [(await create_task(pool, t, {}))["id"] for t in tasks]


async def _as_batch(pool: asyncpg.Pool, tasks: list[NewTask]) -> list[uuid.UUID]:
    return [row["id"] for row in await create_tasks(pool, tasks, {})]


async def _as_group(pool: asyncpg.Pool, tasks: list[NewTask]) -> list[uuid.UUID]:
    items = [(t, {tracing.HEADER: str(tracing.new_trace())}) for t in tasks]
    return [row["id"] for row in await create_group(pool, items)]


async def _with_keys(pool: asyncpg.Pool, tasks: list[NewTask]) -> list[uuid.UUID]:
    ids = []
    for t in tasks:
        row, created = await create_task_once(pool, t, {}, f"key-{t.payload['n']}")
        assert created
        ids.append(row["id"])
    return ids


CREATE_PATHS: dict[str, Create] = {
    "create_task": _one_by_one,
    "create_tasks": _as_batch,
    "create_group": _as_group,
    "create_task_once": _with_keys,
}


# -- 1. a task and its outbox row: one transaction ------------------------------------


@pytest.mark.parametrize("path", sorted(CREATE_PATHS))
async def test_each_create_writes_the_task_and_its_outbox_row_in_one_transaction(
    pool: asyncpg.Pool, path: str
) -> None:
    create = CREATE_PATHS[path]
    first = await create(pool, [task(0), task(1), task(2)])
    second = await create(pool, [task(3)])
    xids = await written_together(pool)
    assert set(xids) == {*first, *second}
    # The check can tell transactions apart: two calls are two transactions.
    assert {xids[i] for i in first}.isdisjoint({xids[i] for i in second})


# The rule that makes an outbox insert fail: a CHECK on this test's own database copy,
# which the task insert knows nothing about. Priority is in the outbox row's body, and it
# is a field the api lets through, so the same rule works over HTTP.
REFUSED_PRIORITY = 7
_REFUSE_EVENTS = (
    "ALTER TABLE outbox ADD CONSTRAINT ck_test_refused_event "
    f"CHECK (body->>'priority' IS DISTINCT FROM '{REFUSED_PRIORITY}')"
)


@pytest.fixture
async def refusing_pool(pool: asyncpg.Pool) -> asyncpg.Pool:
    await pool.execute(_REFUSE_EVENTS)
    return pool


@pytest.mark.parametrize("path", sorted(CREATE_PATHS))
async def test_an_outbox_insert_that_fails_leaves_no_task_and_reaches_the_caller(
    refusing_pool: asyncpg.Pool, path: str
) -> None:
    pool, create = refusing_pool, CREATE_PATHS[path]
    # A refused task alone and, for the many-task paths, one among tasks the outbox
    # would take: all of them or none.
    attempts = [[task(0, REFUSED_PRIORITY)]]
    if path in ("create_tasks", "create_group"):
        attempts.append([task(1), task(2, REFUSED_PRIORITY), task(3)])
    for tasks in attempts:
        with pytest.raises(asyncpg.CheckViolationError) as refused:
            await create(pool, tasks)
        assert refused.value.constraint_name == "ck_test_refused_event"
        assert await task_count(pool) == 0, "a task was committed without its outbox row"
    # The same tasks without the marked priority are stored, each with its row; for the
    # keyed path that also shows the failed create left its key free.
    stored = await create(pool, [task(0), task(2)])
    assert set(await written_together(pool)) == set(stored)


async def test_every_api_create_writes_the_task_and_its_outbox_row_in_one_transaction(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    single = await client.post(TASKS, json={"type": "echo"})
    # Concurrent single creates are grouped into shared statements (api.grouping).
    grouped = await asyncio.gather(
        *(client.post(TASKS, json={"type": "echo", "payload": {"n": n}}) for n in range(30))
    )
    keyed = await client.post(TASKS, json={"type": "echo"}, headers={"Idempotency-Key": "k"})
    batch = await client.post(BATCH, json={"tasks": [{"type": "echo"}] * 5})
    responses = [single, *grouped, keyed, batch]
    assert [r.status_code for r in responses] == [201] * len(responses)

    xids = await written_together(pool)
    ids = {uuid.UUID(r.json()["id"]) for r in [single, *grouped, keyed]}
    ids |= {uuid.UUID(item["id"]) for item in batch.json()["items"]}
    assert set(xids) == ids
    # The grouped path was taken: some single creates shared a transaction.
    assert len({xids[uuid.UUID(r.json()["id"])] for r in grouped}) < len(grouped)


async def test_an_api_create_whose_outbox_row_fails_stores_nothing_and_answers_500(
    client: httpx.AsyncClient, refusing_pool: asyncpg.Pool
) -> None:
    pool, refused = refusing_pool, {"type": "echo", "priority": REFUSED_PRIORITY}

    assert (await client.post(TASKS, json=refused)).status_code == 500
    batch = await client.post(BATCH, json={"tasks": [{"type": "echo"}, refused]})
    assert batch.status_code == 500
    keyed = await client.post(TASKS, json=refused, headers={"Idempotency-Key": "k"})
    assert keyed.status_code == 500
    assert await task_count(pool) == 0, "a task was committed without its outbox row"

    # A group with one refused task: that one fails alone, the others are stored.
    bodies = [refused if n == 3 else {"type": "echo", "payload": {"n": n}} for n in range(10)]
    grouped = await asyncio.gather(*(client.post(TASKS, json=b) for b in bodies))
    assert [r.status_code for r in grouped] == [500 if n == 3 else 201 for n in range(10)]
    # The key left nothing behind: a different request with it is a create, not a 409.
    again = await client.post(TASKS, json={"type": "echo"}, headers={"Idempotency-Key": "k"})
    assert again.status_code == 201, again.text
    created = [r for r in grouped if r.status_code == 201] + [again]
    assert set(await written_together(pool)) == {uuid.UUID(r.json()["id"]) for r in created}


# -- 2. retention never deletes an unpublished row -----------------------------------

# Outbox rows in id order (the order they were created): (name, created days ago,
# published days ago or None). Ids rise with created_at, as in production, but the
# unpublished rows sit among and below old published ones, so no id boundary between
# "old" and "new" can keep them out of a sweep: only their published_at can.
LAYOUT: list[tuple[str, float, float | None]] = [
    ("stuck-30d", 30, None),
    ("old-a", 12, 11.9),
    ("old-b", 12, 11.9),
    ("refused-11d", 11, None),  # its publish was refused again and again
    ("old-c", 10, 9.9),
    ("retrying-10d", 10, None),  # waiting out a backoff that ends in the future
    ("old-d", 9, 8),
    ("old-e", 9, 8),
    ("published-late", 9, 1),  # created long ago, published only yesterday: kept
    ("stuck-8d", 8, None),
    ("recent", 1, 1),
    ("new-unpublished", 0, None),
    ("new-published", 0, 0),
]
OLD_PUBLISHED = {"old-a", "old-b", "old-c", "old-d", "old-e"}


async def lay_out(pool: asyncpg.Pool) -> dict[int, str]:
    """Create the LAYOUT's rows in order and date them; returns outbox id -> name."""
    names: dict[int, str] = {}
    for name, created, published in LAYOUT:
        row = await create_task(pool, NewTask("echo", {"name": name}, 0, 3))
        outbox_id = await pool.fetchval(
            """UPDATE outbox
               SET created_at = now() - make_interval(secs => $2),
                   available_at = now() - make_interval(secs => $2),
                   published_at = now() - make_interval(secs => $3)
               WHERE task_id = $1 RETURNING id""",
            row["id"],
            created * DAY,
            None if published is None else published * DAY,
        )
        names[outbox_id] = name
    await pool.execute(
        """UPDATE outbox SET publish_attempts = 40, last_error = 'NOT_FOUND - no exchange'
           WHERE task_id IN (SELECT id FROM tasks WHERE payload->>'name' = 'refused-11d')"""
    )
    await pool.execute(
        """UPDATE outbox SET available_at = now() + interval '5 minutes', publish_attempts = 2
           WHERE task_id IN (SELECT id FROM tasks WHERE payload->>'name' = 'retrying-10d')"""
    )
    assert sorted(names) == list(names), "outbox ids follow creation order"
    return names


async def remaining(pool: asyncpg.Pool, names: dict[int, str]) -> set[str]:
    return {names[row["id"]] for row in await pool.fetch("SELECT id FROM outbox")}


@pytest.mark.parametrize("batch", [1, 2, 100])
async def test_a_sweep_deletes_exactly_the_old_published_rows_wherever_they_lie(
    pool: asyncpg.Pool, database_url: str, batch: int
) -> None:
    names = await lay_out(pool)
    settings = RelaySettings(
        database_url=database_url,
        outbox_retention=7 * DAY,
        task_retention=None,
        retention_batch=batch,
        _env_file=None,
    )
    async with pool.acquire() as conn:
        report = await sweep(conn, settings)
    kept = await remaining(pool, names)
    unpublished = {name for name, _, published in LAYOUT if published is None}
    assert unpublished <= kept, f"unpublished rows deleted: {sorted(unpublished - kept)}"
    assert kept == {name for name, _, _ in LAYOUT} - OLD_PUBLISHED
    assert report.outbox_deleted == len(OLD_PUBLISHED)
    assert await task_count(pool) == len(LAYOUT), "outbox retention deletes no task"

    async with pool.acquire() as conn:
        assert (await sweep(conn, settings)).outbox_deleted == 0
    assert await remaining(pool, names) == kept


async def test_task_retention_keeps_unfinished_tasks_and_their_unpublished_rows(
    pool: asyncpg.Pool, database_url: str
) -> None:
    # db.retention deletes finished tasks only (their outbox rows cascade). An old task
    # still waiting for its first publish is not finished: it and its row stay.
    names = await lay_out(pool)
    unpublished = {name for name, _, published in LAYOUT if published is None}
    await pool.execute(
        """UPDATE tasks SET created_at = now() - interval '40 days',
                  status = CASE WHEN payload->>'name' = ANY($1::text[]) THEN 'NEW'
                                ELSE 'DONE' END,
                  finished_at = CASE WHEN payload->>'name' = ANY($1::text[]) THEN NULL
                                     ELSE now() - interval '40 days' END""",
        sorted(unpublished),
    )
    settings = RelaySettings(
        database_url=database_url,
        outbox_retention=7 * DAY,
        task_retention=30 * DAY,
        retention_batch=2,
        _env_file=None,
    )
    async with pool.acquire() as conn:
        report = await sweep(conn, settings)
    assert await remaining(pool, names) == unpublished
    kept = {row["name"] for row in await pool.fetch("SELECT payload->>'name' AS name FROM tasks")}
    assert kept == unpublished
    assert report.tasks_deleted == len(LAYOUT) - len(unpublished)


# -- 3. the relay's claim skips rows another claim holds -------------------------------


async def claim_soon(conn: asyncpg.Connection, limit: int) -> outbox.Claim:
    """``claim_batch`` that fails, instead of hanging, if it waits on another's lock."""
    await conn.execute("SET LOCAL lock_timeout = '2s'")
    return await asyncio.wait_for(outbox.claim_batch(conn, limit), timeout=5)


async def test_a_second_claim_skips_the_rows_a_first_claim_holds(pool: asyncpg.Pool) -> None:
    await create_tasks(pool, [task(n) for n in range(10)], {})
    due = {row["id"] for row in await pool.fetch("SELECT id FROM outbox")}
    async with pool.acquire() as a, pool.acquire() as b, pool.acquire() as c:
        first_tx, second_tx, third_tx = a.transaction(), b.transaction(), c.transaction()
        await first_tx.start()
        await second_tx.start()
        await third_tx.start()
        try:
            # A first relay's batch, its transaction still open (publishing, say).
            first = await claim_soon(a, 4)
            held = {row["id"] for row in first.rows}
            assert len(held) == 4
            # A second relay claims at once, and only rows the first does not hold.
            second = await claim_soon(b, 100)
            others = {row["id"] for row in second.rows}
            assert held.isdisjoint(others), "a row was claimed twice"
            assert held | others == due
            # With every due row held, a third claim comes back empty, not blocked.
            third = await claim_soon(c, 100)
            assert (third.rows, third.claimed) == ([], 0)
        finally:
            await third_tx.rollback()
            await second_tx.rollback()
            await first_tx.rollback()
    # Claims that rolled back (relays that died before committing) leave every row due.
    async with pool.acquire() as conn, conn.transaction():
        again = await claim_soon(conn, 100)
    assert {row["id"] for row in again.rows} == due
