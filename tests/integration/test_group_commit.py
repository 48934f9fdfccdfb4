"""Single creates grouped into one statement and one commit (api.grouping), on Postgres.

The rows tell whether creates were grouped: rows written by one transaction share its
``xmin``.
"""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from taskbox.runtime import tracing

TASKS = "/api/v1/tasks"


async def test_concurrent_creates_share_commits_and_each_keeps_its_own_task_and_trace(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    traces = [tracing.new_trace() for _ in range(60)]
    responses = await asyncio.gather(
        *(
            client.post(
                TASKS,
                json={"type": "echo", "payload": {"n": n}, "priority": n % 10, "delay_seconds": n},
                headers={"traceparent": str(trace)},
            )
            for n, trace in enumerate(traces)
        )
    )
    assert [r.status_code for r in responses] == [201] * 60
    rows = await pool.fetch(
        """SELECT t.id::text AS id, t.payload, t.priority, t.xmin::text AS xid,
                  o.headers, o.body, o.available_at - t.created_at AS wait
           FROM tasks t JOIN outbox o ON o.task_id = t.id"""
    )
    assert len(rows) == 60
    by_id = {row["id"]: row for row in rows}
    for n, (response, trace) in enumerate(zip(responses, traces, strict=True)):
        task = response.json()
        assert response.headers["location"] == f"{TASKS}/{task['id']}"
        row = by_id[task["id"]]  # each answer names the row stored for its own request
        assert row["payload"] == task["payload"] == {"n": n}
        assert row["priority"] == task["priority"] == n % 10
        assert row["body"] == {"task_id": task["id"], "type": "echo", "priority": n % 10}
        assert round(row["wait"].total_seconds()) == n
        parent = tracing.parse(row["headers"][tracing.HEADER])
        assert parent is not None and parent.trace_id == trace.trace_id
    # Fewer transactions than tasks: some creates went out together.
    assert len({row["xid"] for row in rows}) < 60


async def test_a_task_postgres_refuses_fails_alone_and_its_group_is_stored(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    # A rule only Postgres knows (this test's own database copy), so the api lets the
    # task through and the grouped statement that carries it fails.
    await pool.execute(
        "ALTER TABLE tasks ADD CONSTRAINT no_poison CHECK (payload->>'x' IS DISTINCT FROM 'poison')"
    )
    payloads = [{"x": "poison" if n == 17 else n} for n in range(40)]
    responses = await asyncio.gather(
        *(client.post(TASKS, json={"type": "echo", "payload": p}) for p in payloads)
    )
    codes = [r.status_code for r in responses]
    assert codes[17] == 500, responses[17].text
    assert codes[:17] + codes[18:] == [201] * 39
    stored = await pool.fetch("SELECT payload FROM tasks JOIN outbox ON outbox.task_id = tasks.id")
    assert sorted(row["payload"]["x"] for row in stored) == list(range(17)) + list(range(18, 40))
