"""Idempotency-Key on POST /api/v1/tasks, against the real Postgres."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

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
