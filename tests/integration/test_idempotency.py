"""Idempotency-Key on POST /api/v1/tasks, against the real Postgres."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx

from taskbox.db.replay import replay_chunk

TASKS = "/api/v1/tasks"
BODY = {"type": "echo", "payload": {"order": 42}}


async def counts(pool: asyncpg.Pool) -> tuple[int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM tasks) AS tasks, (SELECT count(*) FROM outbox) AS events"
    )
    assert row is not None
    return row["tasks"], row["events"]


async def test_the_same_key_and_body_return_the_original_task(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    first = await client.post(TASKS, json=BODY, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == 201, first.text
    second = await client.post(TASKS, json=BODY, headers={"Idempotency-Key": "order-42"})
    assert second.status_code == 200, second.text
    assert second.json() == first.json()
    assert second.headers["location"] == first.headers["location"]
    assert await counts(pool) == (1, 1)


async def test_the_same_key_with_another_body_is_a_409_and_writes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    first = await client.post(TASKS, json=BODY, headers={"Idempotency-Key": "order-43"})
    assert first.status_code == 201
    other = {"type": "echo", "payload": {"order": 43}}
    clash = await client.post(TASKS, json=other, headers={"Idempotency-Key": "order-43"})
    assert clash.status_code == 409, clash.text
    assert clash.headers["content-type"] == "application/problem+json"
    assert first.json()["id"] in clash.json()["detail"]
    assert await counts(pool) == (1, 1)


async def test_different_keys_and_no_key_create_separate_tasks(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    for headers in ({"Idempotency-Key": "a"}, {"Idempotency-Key": "b"}, {}, {}):
        assert (await client.post(TASKS, json=BODY, headers=headers)).status_code == 201
    assert await counts(pool) == (4, 4)


async def test_concurrent_requests_with_one_key_create_exactly_one_task(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    responses = await asyncio.gather(
        *(client.post(TASKS, json=BODY, headers={"Idempotency-Key": "race"}) for _ in range(20))
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 19 + [201], codes
    assert len({r.json()["id"] for r in responses}) == 1
    assert await counts(pool) == (1, 1)


async def test_a_malformed_key_is_a_422(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    for key in ("x" * 201, "has space", ""):
        response = await client.post(TASKS, json=BODY, headers={"Idempotency-Key": key})
        assert response.status_code == 422, (key, response.text)
    assert await counts(pool) == (0, 0)


async def test_a_repeat_after_an_operator_replay_still_matches_the_first_request(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    # Bug: the repeat was compared with the row, whose max_attempts the replay of an
    # exhausted task had raised, and answered 409.
    body = {**BODY, "max_attempts": 1}
    first = await client.post(TASKS, json=body, headers={"Idempotency-Key": "order-44"})
    assert first.status_code == 201, first.text
    task_id = uuid.UUID(first.json()["id"])
    await pool.execute(
        "UPDATE tasks SET status = 'FAILED', attempts = 1, finished_at = now() WHERE id = $1",
        task_id,
    )
    async with pool.acquire() as conn:
        replayed = await replay_chunk(conn, [task_id], {}, force=False)
    assert list(replayed.replayed) == [task_id]
    assert await pool.fetchval("SELECT max_attempts FROM tasks WHERE id = $1", task_id) == 2

    again = await client.post(TASKS, json=body, headers={"Idempotency-Key": "order-44"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == str(task_id)
    clash = await client.post(
        TASKS, json={**body, "max_attempts": 2}, headers={"Idempotency-Key": "order-44"}
    )
    assert clash.status_code == 409, clash.text


async def test_a_task_keyed_before_digests_is_compared_with_its_row(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    first = await client.post(TASKS, json=BODY, headers={"Idempotency-Key": "order-45"})
    assert first.status_code == 201
    await pool.execute("UPDATE tasks SET request_digest = NULL")  # as after the upgrade
    same = await client.post(TASKS, json=BODY, headers={"Idempotency-Key": "order-45"})
    assert same.status_code == 200, same.text
    other = await client.post(
        TASKS, json={**BODY, "priority": 3}, headers={"Idempotency-Key": "order-45"}
    )
    assert other.status_code == 409, other.text
