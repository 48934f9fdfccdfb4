"""The six ways a review lost, stranded or mis-finished a task, each pinned by a test
that failed on the code before the fix (and the suspected ones, decided).

Protocol-level cases run the real SQL steps of db.execution in the order that broke
them; the others run real relay and consumer processes with handlers that misbehave
(tests/integration/misbehaving.py).
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from taskbox.broker.settings import BrokerSettings
from taskbox.consumer.settings import ConsumerSettings
from taskbox.consumer.worker import TaskConsumer
from taskbox.db import execution
from taskbox.db.execution import Delivery, Outcome
from taskbox.db.pool import create_pool
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, cancel_task, create_task
from taskbox.tasktypes import TaskRegistry
from tests.integration.helpers_broker import queue_depth
from tests.integration.test_consumer import (
    Stack,
    assert_queues_empty,
    eventually,
    fetch_task,
    stop_cleanly,
    wait_status,
)

MISBEHAVING = {"TASK_MODULES": "tests.integration.misbehaving"}
STALE_AFTER = 1.0


@pytest.fixture
async def stack(service_env: dict[str, str]) -> AsyncIterator[Stack]:
    procs = Stack(service_env)
    yield procs
    await procs.close()


async def new_task(
    pool: asyncpg.Pool, type_: str, payload: Any, max_attempts: int = 3
) -> uuid.UUID:
    row = await create_task(pool, NewTask(type_, payload, 0, max_attempts))
    task_id: uuid.UUID = row["id"]
    return task_id


async def delivery(pool: asyncpg.Pool, task_id: uuid.UUID) -> Delivery:
    """A message for the task's newest outbox row, as the relay would send it now."""
    newest = await pool.fetchval("SELECT max(id) FROM outbox WHERE task_id = $1", task_id)
    return Delivery(task_id, newest)


async def claim(pool: asyncpg.Pool, task_id: uuid.UUID, worker: str) -> asyncpg.Record:
    [row] = await execution.claim_tasks(pool, [await delivery(pool, task_id)], worker, 30)
    assert row["claimed"], dict(row)
    return row


async def retry_rows(pool: asyncpg.Pool, task_id: uuid.UUID) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE task_id = $1 AND kind = 'task.retry'", task_id
    )
    return count


# -- 3. an accepted cancel is never forgotten ------------------------------------------


async def test_a_cancel_accepted_while_running_wins_over_a_retry(pool: asyncpg.Pool) -> None:
    task_id = await new_task(pool, "echo", {})
    claimed = await claim(pool, task_id, "w1")
    cancelled = await cancel_task(pool, task_id)
    assert cancelled.changed and cancelled.task is not None
    assert cancelled.task["cancel_requested"]  # the 202 case

    retry = Outcome(
        task_id, 1, "NEW", error={"type": "E", "message": "m"}, retry_in=0.0, lease=claimed["lease"]
    )
    assert await execution.finish_tasks(pool, [retry], "w1") == {task_id: "CANCELLED"}
    row = await fetch_task(pool, task_id)
    assert row["status"] == "CANCELLED"
    assert row["error"]["type"] == "Cancelled"
    assert row["finished_at"] is not None
    assert await retry_rows(pool, task_id) == 0  # no other attempt is sent


async def test_a_cancel_accepted_while_running_wins_over_a_shutdown_release(
    pool: asyncpg.Pool,
) -> None:
    task_id = await new_task(pool, "echo", {})
    claimed = await claim(pool, task_id, "w1")
    await cancel_task(pool, task_id)
    release = Outcome(task_id, 1, "PENDING", lease=claimed["lease"])
    assert await execution.finish_tasks(pool, [release], "w1") == {task_id: "CANCELLED"}
    row = await fetch_task(pool, task_id)
    assert (row["status"], row["attempts"]) == ("CANCELLED", 1)


async def test_a_cancel_accepted_while_running_wins_over_the_rescue(pool: asyncpg.Pool) -> None:
    task_id = await new_task(pool, "echo", {})
    await claim(pool, task_id, "w1")
    await cancel_task(pool, task_id)
    await pool.execute(
        "UPDATE tasks SET heartbeat_at = now() - interval '1 minute' WHERE id = $1", task_id
    )
    rescued = await execution.rescue_stale(pool, 30)
    assert [(r["id"], r["status"]) for r in rescued] == [(task_id, "CANCELLED")]


# -- 4. the fence is a lease that only grows ------------------------------------------


async def test_a_release_retried_after_its_reply_was_lost_cannot_touch_the_next_owner(
    pool: asyncpg.Pool,
) -> None:
    task_id = await new_task(pool, "echo", {})
    first = await claim(pool, task_id, "w1")
    release = Outcome(task_id, first["attempts"], "PENDING", lease=first["lease"])
    # The release commits; its reply is lost, so w1 will send it again.
    assert await execution.finish_tasks(pool, [release], "w1") == {task_id: "NEW"}
    second = await claim(pool, task_id, "w2")
    assert second["attempts"] == first["attempts"]  # the released attempt was given back
    assert second["lease"] > first["lease"]

    assert await execution.finish_tasks(pool, [release], "w1") == {}  # the retry: nothing
    row = await fetch_task(pool, task_id)
    assert (row["status"], row["worker_id"]) == ("PROCESSING", "w2")
    assert await execution.heartbeat(pool, [(task_id, second["lease"])], "w2") == {task_id: False}
    assert await execution.heartbeat(pool, [(task_id, first["lease"])], "w1") == {}
    done = Outcome(task_id, second["attempts"], "DONE", result={"ok": 2}, lease=second["lease"])
    assert await execution.finish_tasks(pool, [done], "w2") == {task_id: "DONE"}


async def test_a_release_does_not_count_on_its_own_message(pool: asyncpg.Pool) -> None:
    # w1 runs the task; its channel closes, the broker redelivers the message to w2,
    # whose claim finds the task owned by a live consumer and rightly drops it. Then w1
    # shuts down and hands the task back: with only the (gone) message to requeue, the
    # task stayed PENDING with nothing to run it. The release must bring its own row.
    task_id = await new_task(pool, "echo", {})
    message = await delivery(pool, task_id)
    first = await claim(pool, task_id, "w1")
    [refused] = await execution.claim_tasks(pool, [message], "w2", 30)
    assert (refused["claimed"], refused["seen_status"]) == (False, "PROCESSING")

    release = Outcome(task_id, first["attempts"], "PENDING", lease=first["lease"])
    assert await execution.finish_tasks(pool, [release], "w1") == {task_id: "NEW"}

    row = await fetch_task(pool, task_id)
    assert (row["status"], row["attempts"]) == ("NEW", 0)
    newer = await pool.fetchval(
        "SELECT max(id) FROM outbox WHERE task_id = $1 AND published_at IS NULL", task_id
    )
    assert newer is not None and newer > message.outbox_id  # the relay's way forward


async def test_a_stale_owner_cannot_overwrite_the_current_owners_outcome(
    pool: asyncpg.Pool,
) -> None:
    task_id = await new_task(pool, "echo", {})
    stale = await claim(pool, task_id, "w1")
    await pool.execute(
        "UPDATE tasks SET heartbeat_at = now() - interval '1 minute' WHERE id = $1", task_id
    )
    await execution.rescue_stale(pool, 30)
    current = await claim(pool, task_id, "w2")
    late = Outcome(task_id, stale["attempts"], "DONE", result={"by": "w1"}, lease=stale["lease"])
    assert await execution.finish_tasks(pool, [late], "w1") == {}
    done = Outcome(
        task_id, current["attempts"], "DONE", result={"by": "w2"}, lease=current["lease"]
    )
    assert await execution.finish_tasks(pool, [done], "w2") == {task_id: "DONE"}
    assert await execution.finish_tasks(pool, [late], "w1") == {}  # nor after it finished
    assert (await fetch_task(pool, task_id))["result"] == {"by": "w2"}


async def test_a_claim_lost_in_a_failover_hands_its_lease_out_again_but_not_its_fence(
    pool: asyncpg.Pool,
) -> None:
    # A failover to an asynchronous standby can undo a claim after w1 got its answer. The
    # task's row is then as before the claim, and the next claim, w2's, takes the same
    # lease number. w1's heartbeat and outcome must not pass for w2's.
    task_id = await new_task(pool, "echo", {})
    before = await pool.fetchrow("SELECT status, lease, attempts FROM tasks WHERE id = $1", task_id)
    assert before is not None
    lost = await claim(pool, task_id, "w1")
    await pool.execute(
        "UPDATE tasks SET status = $2, lease = $3, attempts = $4, worker_id = NULL,"
        " started_at = NULL, heartbeat_at = NULL WHERE id = $1",
        task_id,
        before["status"],
        before["lease"],
        before["attempts"],
    )  # the failover
    current = await claim(pool, task_id, "w2")
    assert current["lease"] == lost["lease"]

    assert await execution.heartbeat(pool, [(task_id, lost["lease"])], "w1") == {}
    late = Outcome(task_id, lost["attempts"], "DONE", result={"by": "w1"}, lease=lost["lease"])
    assert await execution.finish_tasks(pool, [late], "w1") == {}
    assert await execution.heartbeat(pool, [(task_id, current["lease"])], "w2") == {task_id: False}
    done = Outcome(
        task_id, current["attempts"], "DONE", result={"by": "w2"}, lease=current["lease"]
    )
    assert await execution.finish_tasks(pool, [done], "w2") == {task_id: "DONE"}
    assert (await fetch_task(pool, task_id))["result"] == {"by": "w2"}


# -- suspected: an old message running a retry before its backoff ---------------------


async def test_an_old_message_does_not_run_a_retry_before_its_backoff(pool: asyncpg.Pool) -> None:
    task_id = await new_task(pool, "echo", {})
    old = await delivery(pool, task_id)
    first = await claim(pool, task_id, "w1")
    retry = Outcome(
        task_id, 1, "NEW", error={"type": "E", "message": "m"}, retry_in=60.0, lease=first["lease"]
    )
    assert await execution.finish_tasks(pool, [retry], "w1") == {task_id: "NEW"}
    # A redelivery of the first attempt's message: superseded by the unpublished retry row.
    [row] = await execution.claim_tasks(pool, [old], "w2", 30)
    assert (row["claimed"], row["seen_status"]) == (False, "NEW")
    # The retry row's own message, arriving before the relay's commit, still claims it.
    [row] = await execution.claim_tasks(pool, [await delivery(pool, task_id)], "w2", 30)
    assert row["claimed"]


# -- 5. one unstorable outcome fails alone --------------------------------------------


async def test_an_outcome_postgres_refuses_fails_alone_and_its_batch_mates_commit_once(
    pool: asyncpg.Pool,
) -> None:
    ids = [await new_task(pool, "echo", {"n": n}, max_attempts=1) for n in range(3)]
    leases = {row["id"]: row["lease"] for row in [await claim(pool, t, "w1") for t in ids]}
    poisoned = orjson.Fragment(b'{"text": "NUL \\u0000 here"}')  # past the attempt's check
    outcomes = [
        Outcome(ids[0], 1, "DONE", result={"n": 0}, lease=leases[ids[0]]),
        Outcome(ids[1], 1, "DONE", result=poisoned, lease=leases[ids[1]]),
        Outcome(ids[2], 1, "DONE", result={"n": 2}, lease=leases[ids[2]]),
    ]
    consumer = TaskConsumer(pool, TaskRegistry(), ConsumerSettings(), "w1")
    recorded = await consumer._write_outcomes(outcomes)

    assert recorded == {ids[0]: "DONE", ids[1]: "FAILED", ids[2]: "DONE"}
    rows = {r["id"]: r for r in [await fetch_task(pool, t) for t in ids]}
    assert rows[ids[0]]["result"] == {"n": 0}
    assert rows[ids[2]]["result"] == {"n": 2}
    assert rows[ids[1]]["error"]["type"] == "UnstorableOutcome"
    assert "could not be stored" in rows[ids[1]]["error"]["message"]
    assert consumer.metrics.unstorable._value.get() == 1


async def test_a_read_only_database_fails_no_outcome_and_is_waited_out(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    """A database that refuses every write (a demoted primary after a failover, or one
    set read-only) is not one outcome's fault: nothing is written as UnstorableOutcome;
    the completer waits it out as an outage, and the outcomes are written once the
    database takes writes again (on a new connection: the pool drops read-only ones)."""
    ids = [await new_task(pool, "echo", {"n": n}, max_attempts=1) for n in range(2)]
    leases = {row["id"]: row["lease"] for row in [await claim(pool, t, "w1") for t in ids]}
    outcomes = [Outcome(t, 1, "DONE", result={"ok": True}, lease=leases[t]) for t in ids]
    database = await pool.fetchval("SELECT current_database()")
    await pool.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    read_only = await create_pool(db_settings, min_size=1, max_size=2)
    try:
        consumer = TaskConsumer(read_only, TaskRegistry(), ConsumerSettings(), "w1")
        writing = asyncio.create_task(consumer._write_outcomes(outcomes))
        await asyncio.sleep(1.5)
        assert not writing.done(), "a read-only database is an outage to wait out"
        statuses = [(await fetch_task(pool, t))["status"] for t in ids]
        assert statuses == ["PROCESSING", "PROCESSING"]
        assert consumer.metrics.unstorable._value.get() == 0
        await pool.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        await asyncio.wait_for(writing, 30)
    finally:
        await pool.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        await read_only.close()
    statuses = [(await fetch_task(pool, t))["status"] for t in ids]
    assert statuses == ["DONE", "DONE"]
    assert consumer.metrics.unstorable._value.get() == 0


async def test_unstorable_results_and_errors_fail_their_task_and_the_consumer_goes_on(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    await stack.relay()
    consumer = await stack.consumer(**MISBEHAVING)
    result = await new_task(pool, "unstorable-result", {}, max_attempts=1)
    error = await new_task(pool, "unstorable-error", {}, max_attempts=1)
    innocent = [await new_task(pool, "echo", {"n": n}, max_attempts=1) for n in range(20)]

    failed = await wait_status(pool, result, "DONE", "FAILED", stack=stack)
    assert failed["status"] == "FAILED"
    assert failed["error"]["type"] == "UnserializableResult"
    assert "NUL" in failed["error"]["message"]
    raised = await wait_status(pool, error, "DONE", "FAILED", stack=stack)
    assert raised["status"] == "FAILED"
    assert raised["error"]["type"] == "RuntimeError"
    assert "\ufffd" in raised["error"]["message"]
    for task_id in innocent:
        assert (await wait_status(pool, task_id, "DONE", "FAILED", stack=stack))["status"] == "DONE"
    await stop_cleanly(consumer)  # it never died of it: exit 0 on SIGTERM
    await assert_queues_empty(broker_settings)


# -- 2. every run ends in exactly one outcome -----------------------------------------


async def test_a_cancellation_the_consumer_did_not_ask_for_is_a_failed_attempt(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    await stack.relay()
    consumer = await stack.consumer(**MISBEHAVING, RETRY_BASE_DELAY="0.05")
    task_id = await new_task(pool, "inner-cancelled", {}, max_attempts=2)
    row = await wait_status(pool, task_id, "DONE", "FAILED", "CANCELLED", stack=stack)
    assert (row["status"], row["attempts"]) == ("FAILED", 2)
    assert row["error"]["type"] == "HandlerCancelled"
    await stop_cleanly(consumer)
    await assert_queues_empty(broker_settings)


async def test_a_handler_ignoring_its_timeout_is_abandoned_after_the_grace(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    await stack.relay()
    consumer = await stack.consumer(
        **MISBEHAVING, HANDLER_TIMEOUT="0.5", HANDLER_CANCEL_GRACE="0.5"
    )
    task_id = await new_task(pool, "stubborn", {"seconds": 60}, max_attempts=1)
    row = await wait_status(pool, task_id, "DONE", "FAILED", within=10, stack=stack)
    assert row["status"] == "FAILED"
    assert row["error"]["type"] == "HandlerTimeout"
    assert "abandoned" in row["error"]["message"]
    await consumer.wait_for("abandoning a handler that ignored its timeout")
    await stop_cleanly(consumer)
    await assert_queues_empty(broker_settings)


async def test_a_handler_ignoring_a_cancel_is_abandoned_and_the_task_ends_cancelled(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    await stack.relay()
    consumer = await stack.consumer(**MISBEHAVING, HANDLER_CANCEL_GRACE="0.5")
    task_id = await new_task(pool, "stubborn", {"seconds": 60})
    await wait_status(pool, task_id, "PROCESSING", stack=stack)
    assert (await cancel_task(pool, task_id)).changed
    row = await wait_status(pool, task_id, "DONE", "FAILED", "CANCELLED", within=10, stack=stack)
    assert (row["status"], row["attempts"]) == ("CANCELLED", 1)
    await stop_cleanly(consumer)
    await assert_queues_empty(broker_settings)


async def test_a_handler_ignoring_the_shutdown_is_abandoned_and_its_task_handed_back(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    await stack.relay()
    consumer = await stack.consumer(**MISBEHAVING, SHUTDOWN_GRACE="0.3", HANDLER_CANCEL_GRACE="0.5")
    task_id = await new_task(pool, "stubborn", {"seconds": 60})
    await wait_status(pool, task_id, "PROCESSING", stack=stack)
    assert consumer.proc is not None
    consumer.proc.send_signal(signal.SIGTERM)
    assert await consumer.wait(timeout=10) == 0, consumer.output
    # Handed back through a new outbox row, which the relay publishes.
    row = await wait_status(pool, task_id, "PENDING", stack=stack)
    assert row["attempts"] == 0  # its attempt given back
    assert await retry_rows(pool, task_id) == 1
    assert await queue_depth(broker_settings, broker_settings.queue_name) == 1


# -- 1. a stale run never swallows its task's new message -----------------------------


async def test_a_run_that_lost_its_task_while_stalled_hands_the_new_message_to_the_claim(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    # The consumer's event loop stalls (a sync call) past TASK_STALE_AFTER; the test plays
    # the other consumer's rescue; the relay publishes the retry while the stale run goes
    # on. The bug: the new message was taken for a duplicate of the running attempt, the
    # stale outcome was refused, the new message acked: PENDING with nothing to run it.
    await stack.relay()
    consumer = await stack.consumer(
        **MISBEHAVING,
        HEARTBEAT_INTERVAL="0.2",
        TASK_STALE_AFTER=str(STALE_AFTER),
        RESCUE_INTERVAL="3600",  # the test rescues, at the moment it chooses
    )
    task_id = await new_task(pool, "stall", {"seconds": 2.5, "then": 3.0})
    await wait_status(pool, task_id, "PROCESSING", stack=stack)
    await eventually(
        lambda: pool.fetchval(
            "SELECT heartbeat_at < now() - make_interval(secs => $2) FROM tasks WHERE id = $1",
            task_id,
            STALE_AFTER,
        ),
        bool,
        "the stalled consumer's heartbeat to go stale",
        stack=stack,
    )
    rescued = await execution.rescue_stale(pool, STALE_AFTER)
    assert [(r["id"], r["status"]) for r in rescued] == [(task_id, "NEW")]

    row = await wait_status(pool, task_id, "DONE", "FAILED", within=20, stack=stack)
    assert row["status"] == "DONE"
    assert row["result"] == {"attempt": 2}
    await consumer.wait_for("stopping an attempt whose task is no longer ours")
    await stop_cleanly(consumer)
    await assert_queues_empty(broker_settings)


# -- the shutdown always ends ---------------------------------------------------------


async def test_a_shutdown_ends_when_its_last_running_task_is_lost_meanwhile(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    # A handler that ignores the stop keeps the shutdown waiting; meanwhile another
    # consumer takes its task (the test plays that claim). The shutdown must notice the
    # loss, hand the message back and exit, not wait for an outcome that never comes.
    await stack.relay()
    consumer = await stack.consumer(**MISBEHAVING, SHUTDOWN_GRACE="0.2", HANDLER_CANCEL_GRACE="60")
    task_id = await new_task(pool, "stubborn", {"seconds": 60})
    await wait_status(pool, task_id, "PROCESSING", stack=stack)
    assert consumer.proc is not None
    consumer.proc.send_signal(signal.SIGTERM)
    await consumer.wait_for("waiting up to")
    await pool.execute(
        "UPDATE tasks SET lease = lease + 1, worker_id = 'another consumer' WHERE id = $1",
        task_id,
    )
    assert await consumer.wait(timeout=15) == 0, consumer.output
    assert "no longer ours" in consumer.output
    row = await fetch_task(pool, task_id)
    assert (row["status"], row["worker_id"]) == ("PROCESSING", "another consumer")
    assert await queue_depth(broker_settings, broker_settings.queue_name) == 1  # handed back


async def test_a_consumer_whose_background_loop_dies_exits_3_with_tasks_running(
    pool: asyncpg.Pool, stack: Stack
) -> None:
    # The schema changes under a running task (a column the heartbeat writes is gone:
    # an error no retry can help): the heartbeat loop dies on it, and the process must
    # exit 3 for its supervisor, not wait for ever for outcomes its (cancelled)
    # completer will never commit.
    await stack.relay()
    consumer = await stack.consumer(SHUTDOWN_GRACE="0.5", HEARTBEAT_INTERVAL="0.2")
    task_id = await new_task(pool, "sleep", {"seconds": 30})
    await wait_status(pool, task_id, "PROCESSING", stack=stack)
    await pool.execute("ALTER TABLE tasks RENAME COLUMN heartbeat_at TO heartbeat_gone")
    try:
        assert await consumer.wait(timeout=20) == 3, consumer.output
    finally:
        await pool.execute("ALTER TABLE tasks RENAME COLUMN heartbeat_gone TO heartbeat_at")
    assert "background loop" in consumer.output
