"""The consumer, end to end: real ``python -m relay`` and ``python -m consumer`` processes
against the real Postgres and RabbitMQ.

Tasks are created with ``db.tasks.create_task`` (task + outbox row in one statement),
the relay publishes them, the consumer runs them. Raw messages (garbage, duplicates)
are published straight to the test's exchange. Every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import aio_pika
import asyncpg
import orjson
import pytest

from taskbox.broker import messages, topology
from taskbox.broker.settings import BrokerSettings
from taskbox.db.tasks import NewTask, cancel_task, create_task, get_task
from tests.integration.processes import ServiceProcess

T = TypeVar("T")

# Short timings so heartbeats, rescues and retries happen within a test's patience.
# TASK_STALE_AFTER must exceed 2 * HEARTBEAT_INTERVAL (the consumer checks that).
FAST_CONSUMER = {
    "HEARTBEAT_INTERVAL": "0.3",
    "TASK_STALE_AFTER": "1.5",
    "RESCUE_INTERVAL": "0.3",
    "RETRY_BASE_DELAY": "0.05",
    "RETRY_MAX_DELAY": "0.2",
}
STALE_AFTER = float(FAST_CONSUMER["TASK_STALE_AFTER"])
FAST_RELAY = {"RELAY_POLL_INTERVAL": "0.2"}

TERMINAL = ("DONE", "FAILED", "CANCELLED")


# -- processes ------------------------------------------------------------------------


class Stack:
    """Starts relay/consumer processes for one test; kills whatever is left at teardown."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.procs: list[ServiceProcess] = []

    async def start(self, module: str, **extra_env: str) -> ServiceProcess:
        proc = ServiceProcess(module, self._env, **extra_env)
        self.procs.append(proc)
        return await proc.start()

    async def relay(self, **extra_env: str) -> ServiceProcess:
        return await self.start("relay", **{**FAST_RELAY, **extra_env})

    async def consumer(self, **extra_env: str) -> ServiceProcess:
        return await self.start("consumer", **{**FAST_CONSUMER, **extra_env})

    def outputs(self) -> str:
        return "\n".join(f"----- {p.module} (pid {pid(p)}) -----\n{p.output}" for p in self.procs)

    async def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            if proc.proc is not None:
                with contextlib.suppress(TimeoutError):
                    await proc.wait(timeout=10)


@pytest.fixture
async def stack(service_env: dict[str, str]) -> AsyncIterator[Stack]:
    procs = Stack(service_env)
    yield procs
    await procs.close()


def pid(proc: ServiceProcess) -> int:
    assert proc.proc is not None
    return proc.proc.pid


def is_running(proc: ServiceProcess) -> bool:
    return proc.proc is not None and proc.proc.returncode is None


def send(proc: ServiceProcess, sig: signal.Signals) -> None:
    assert proc.proc is not None
    assert proc.proc.returncode is None, proc.output
    proc.proc.send_signal(sig)


async def stop_cleanly(*procs: ServiceProcess) -> None:
    """SIGTERM each process; each must exit 0."""
    for proc in procs:
        code = await proc.stop(signal.SIGTERM, timeout=20)
        assert code == 0, f"{proc.module} exited {code} on SIGTERM:\n{proc.output}"


# -- polling --------------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    what: str,
    within: float = 15.0,
    stack: Stack | None = None,
) -> T:
    """Poll ``check`` until ``accept`` holds for its value; fail with the last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await check()
        if accept(value):
            return value
        if loop.time() > deadline:
            logs = f"\n{stack.outputs()}" if stack is not None else ""
            raise AssertionError(
                f"timed out after {within}s waiting for {what}; last: {value!r}{logs}"
            )
        await asyncio.sleep(0.05)


async def fetch_task(pool: asyncpg.Pool, task_id: uuid.UUID) -> asyncpg.Record:
    row = await get_task(pool, task_id)
    assert row is not None, f"task {task_id} vanished"
    return row


async def wait_status(
    pool: asyncpg.Pool,
    task_id: uuid.UUID,
    *statuses: str,
    within: float = 15.0,
    stack: Stack | None = None,
) -> asyncpg.Record:
    row: asyncpg.Record = await eventually(
        lambda: fetch_task(pool, task_id),
        lambda row: row["status"] in statuses,
        f"task {task_id} to be {'/'.join(statuses)}",
        within,
        stack,
    )
    return row


async def new_task(
    pool: asyncpg.Pool, type_: str, payload: dict[str, Any], max_attempts: int = 3
) -> uuid.UUID:
    row = await create_task(pool, NewTask(type_, payload, 0, max_attempts))
    task_id: uuid.UUID = row["id"]
    return task_id


async def outbox_kinds(pool: asyncpg.Pool, task_id: uuid.UUID) -> list[str]:
    rows = await pool.fetch("SELECT kind FROM outbox WHERE task_id = $1 ORDER BY id", task_id)
    return [row["kind"] for row in rows]


# -- broker ---------------------------------------------------------------------------


async def queue_depth(settings: BrokerSettings, name: str) -> int:
    """Ready messages in ``name`` (unacked ones are not counted until their channel closes)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count


async def wait_depth(
    settings: BrokerSettings, name: str, expected: int, stack: Stack | None = None
) -> None:
    await eventually(
        lambda: queue_depth(settings, name),
        lambda n: n == expected,
        f"{expected} ready messages in {name}",
        within=10.0,
        stack=stack,
    )


async def publish_raw(settings: BrokerSettings, bodies: Iterable[bytes]) -> None:
    """Publish bodies to the task exchange with the queue's routing key, with confirms."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await topology.declare(channel, settings)
        for body in bodies:
            await declared.exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=declared.routing_key,
            )


async def publish_task_message(
    settings: BrokerSettings, pool: asyncpg.Pool, task_id: uuid.UUID, copies: int = 1
) -> None:
    """Publish ``copies`` messages for the task exactly as the relay would build them."""
    row = await pool.fetchrow(
        "SELECT id, kind, body FROM outbox WHERE task_id = $1 ORDER BY id LIMIT 1", task_id
    )
    assert row is not None
    message = messages.encode(outbox_id=row["id"], kind=row["kind"], body=row["body"], headers={})
    await publish_raw(settings, [message.body] * copies)


async def drain_dead_letters(settings: BrokerSettings) -> list[bytes]:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.dead_letter_queue, passive=True)
        bodies = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
        return bodies


async def assert_queues_empty(settings: BrokerSettings) -> None:
    """Call once every consumer has exited: any unacked message would be back to ready."""
    assert await queue_depth(settings, settings.queue_name) == 0
    assert await queue_depth(settings, settings.dead_letter_queue) == 0
    assert await queue_depth(settings, settings.dead_letter_watch_queue) == 0


# -- 1. the happy path at volume ------------------------------------------------------


async def test_300_echo_tasks_end_done_once_each_and_the_queue_drains(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    relay = await stack.relay()
    consumers = [await stack.consumer(), await stack.consumer()]
    payloads = {}
    for i in range(300):
        payload = {"n": i, "text": f"task {i}", "nested": {"even": i % 2 == 0}}
        payloads[await new_task(pool, "echo", payload)] = payload

    await eventually(
        lambda: pool.fetchval("SELECT count(*) FROM tasks WHERE status = 'DONE'"),
        lambda n: n == 300,
        "300 DONE tasks",
        within=30.0,
        stack=stack,
    )
    rows = await pool.fetch("SELECT id, status, payload, result, attempts, error FROM tasks")
    assert len(rows) == 300
    for row in rows:
        assert row["status"] == "DONE"
        assert row["result"] == payloads[row["id"]] == row["payload"]
        assert row["attempts"] == 1, row
        assert row["error"] is None
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE kind <> 'task.created'") == 0

    await stop_cleanly(*consumers, relay)
    # With the consumers gone, unacked messages would have been requeued: none were.
    await assert_queues_empty(broker_settings)


# -- 3. dead letters ----------------------------------------------------------------


async def test_unparseable_and_orphan_messages_are_dead_lettered_and_the_consumer_goes_on(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    relay = await stack.relay()
    consumer = await stack.consumer()
    orphan = messages.encode(
        outbox_id=424242,
        kind="task.created",
        body={"task_id": str(uuid.uuid4()), "type": "echo"},
        headers={},
    ).body
    bad = [
        b"not json",
        orjson.dumps({"type": "echo", "outbox_id": 1}),  # no task_id
        orjson.dumps({"task_id": "not-a-uuid", "type": "echo", "outbox_id": 1}),
        b"[1, 2, 3]",
        b"\xff\xfe\x00",
        orphan,  # well-formed, names a task that does not exist
    ]
    await publish_raw(broker_settings, bad)

    await wait_depth(broker_settings, broker_settings.dead_letter_queue, len(bad), stack)
    assert is_running(consumer), consumer.output
    await consumer.wait_for("dead-lettering a message that is not a task", timeout=10)
    await consumer.wait_for("dead-lettering a message for a task that does not exist", timeout=10)

    task_id = await new_task(pool, "echo", {"after": "garbage"})
    row = await wait_status(pool, task_id, *TERMINAL, stack=stack)
    assert row["status"] == "DONE"
    assert row["result"] == {"after": "garbage"}

    assert sorted(await drain_dead_letters(broker_settings)) == sorted(bad)
    await stop_cleanly(consumer, relay)
    await assert_queues_empty(broker_settings)


# -- 4. duplicates and cancelled tasks ------------------------------------------------


async def test_duplicate_deliveries_run_the_handler_once(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    # No relay: the messages are published by hand (the claim accepts a NEW task, as it
    # must when a message overtakes the relay's commit).
    consumer = await stack.consumer(LOG_LEVEL="DEBUG")
    task_id = await new_task(pool, "sleep", {"seconds": 0.5})
    await publish_task_message(broker_settings, pool, task_id, copies=2)

    done = await wait_status(pool, task_id, *TERMINAL, stack=stack)
    assert done["status"] == "DONE"
    assert done["attempts"] == 1
    assert done["result"] == {"slept": 0.5}

    # A third copy after completion is dropped as well.
    await publish_task_message(broker_settings, pool, task_id)
    await consumer.wait_for("dropping duplicate delivery; task is DONE", timeout=10)
    after = await fetch_task(pool, task_id)
    assert after["attempts"] == 1
    assert after["finished_at"] == done["finished_at"]
    assert after["updated_at"] == done["updated_at"]

    await stop_cleanly(consumer)
    await assert_queues_empty(broker_settings)


async def test_a_task_cancelled_while_new_is_never_sent_nor_run(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    task_id = await new_task(pool, "echo", {"never": "run"})
    cancelled = await cancel_task(pool, task_id)
    assert cancelled.changed
    assert cancelled.task is not None
    assert cancelled.task["status"] == "CANCELLED"

    relay = await stack.relay()
    consumer = await stack.consumer()
    witness = await new_task(pool, "echo", {"runs": True})
    await eventually(
        lambda: pool.fetchval("SELECT status FROM tasks WHERE id = $1", witness),
        lambda status: status == "DONE",
        "a task created after it to run",
        stack=stack,
    )
    # The relay closed its row without sending it.
    closed = await pool.fetchrow(
        "SELECT published_at, last_error FROM outbox WHERE task_id = $1", task_id
    )
    assert closed["published_at"] is not None
    assert closed["last_error"] == "not sent: task CANCELLED"
    row = await fetch_task(pool, task_id)
    assert (row["status"], row["attempts"], row["started_at"]) == ("CANCELLED", 0, None)

    await stop_cleanly(consumer, relay)
    await assert_queues_empty(broker_settings)


async def test_a_task_cancelled_while_pending_is_never_run_and_its_message_is_dropped(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    task_id = await new_task(pool, "echo", {"never": "run"})
    relay = await stack.relay()
    # Published, confirmed, and waiting in the queue: no consumer runs yet.
    await eventually(
        lambda: pool.fetchval("SELECT status FROM tasks WHERE id = $1", task_id),
        lambda status: status == "PENDING",
        "the task to be published",
        stack=stack,
    )
    cancelled = await cancel_task(pool, task_id)
    assert cancelled.changed
    assert cancelled.task is not None
    assert cancelled.task["status"] == "CANCELLED"

    consumer = await stack.consumer(LOG_LEVEL="DEBUG")
    await consumer.wait_for("dropping duplicate delivery; task is CANCELLED", timeout=10)

    row = await fetch_task(pool, task_id)
    assert row["status"] == "CANCELLED"
    assert row["attempts"] == 0
    assert row["started_at"] is None
    assert row["result"] is None
    assert row["worker_id"] is None

    await stop_cleanly(consumer, relay)
    await assert_queues_empty(broker_settings)


# -- 5. retries through the outbox ----------------------------------------------------


async def test_retries_go_through_the_outbox_until_success_or_exhaustion(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    relay = await stack.relay()
    consumer = await stack.consumer(HANDLER_TIMEOUT="0.5")
    recovers = await new_task(pool, "fail", {"succeed_on_attempt": 3}, max_attempts=5)
    exhausts = await new_task(pool, "fail", {"retryable": True}, max_attempts=2)
    permanent = await new_task(pool, "fail", {"retryable": False}, max_attempts=5)
    times_out = await new_task(pool, "sleep", {"seconds": 30}, max_attempts=2)
    # Payloads the API would refuse, and a type this consumer does not know.
    invalid = await new_task(pool, "sleep", {"seconds": "long"}, max_attempts=5)
    unknown = await new_task(pool, "no-such-type", {}, max_attempts=2)

    rows = {
        task_id: await wait_status(pool, task_id, *TERMINAL, stack=stack)
        for task_id in (recovers, exhausts, permanent, times_out, invalid, unknown)
    }

    row = rows[recovers]
    assert (row["status"], row["attempts"]) == ("DONE", 3)
    assert row["result"] == {"succeeded_on_attempt": 3}
    assert row["error"] is None
    assert await outbox_kinds(pool, recovers) == ["task.created", "task.retry", "task.retry"]

    row = rows[exhausts]
    assert (row["status"], row["attempts"]) == ("FAILED", 2)
    assert row["error"]["type"] == "DrillFailure"
    assert row["error"]["message"] == "drill"
    assert row["result"] is None
    assert await outbox_kinds(pool, exhausts) == ["task.created", "task.retry"]

    row = rows[permanent]
    assert (row["status"], row["attempts"]) == ("FAILED", 1)
    assert row["error"]["type"] == "PermanentError"
    assert await outbox_kinds(pool, permanent) == ["task.created"]

    row = rows[times_out]
    assert (row["status"], row["attempts"]) == ("FAILED", 2)
    assert row["error"]["type"] == "HandlerTimeout"

    row = rows[invalid]
    assert (row["status"], row["attempts"]) == ("FAILED", 1)
    assert row["error"]["type"] == "PermanentError"
    assert "payload no longer valid" in row["error"]["message"]

    row = rows[unknown]
    assert (row["status"], row["attempts"]) == ("FAILED", 2)
    assert row["error"]["type"] == "UnknownTaskType"

    for row in rows.values():
        assert row["finished_at"] is not None
        assert row["heartbeat_at"] is None
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0

    await stop_cleanly(consumer, relay)
    await assert_queues_empty(broker_settings)


async def test_with_builtin_task_types_off_the_consumer_runs_no_builtin(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    """BUILTIN_TASK_TYPES=false: the consumer registers none of the demo types, so a
    task of one (created before the api stopped accepting them) fails as unknown."""
    relay = await stack.relay()
    consumer = await stack.consumer(BUILTIN_TASK_TYPES="false")
    (started,) = [line for line in consumer.lines if "task types:" in line]
    listed = started.split("task types:", 1)[1].strip()
    assert not {"echo", "sleep", "sha256", "fail"} & set(listed.split(", ")), started
    task_id = await new_task(pool, "echo", {"x": 1}, max_attempts=1)
    row = await wait_status(pool, task_id, *TERMINAL, stack=stack)
    assert (row["status"], row["attempts"]) == ("FAILED", 1)
    assert row["error"]["type"] == "UnknownTaskType"
    assert row["result"] is None
    await stop_cleanly(consumer, relay)
    await assert_queues_empty(broker_settings)


# -- 6. cancel while running ----------------------------------------------------------


async def test_cancelling_a_running_task_stops_it_within_a_few_heartbeats(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    relay = await stack.relay()
    consumer = await stack.consumer()
    task_id = await new_task(pool, "sleep", {"seconds": 30})
    await wait_status(pool, task_id, "PROCESSING", stack=stack)

    requested = await cancel_task(pool, task_id)
    assert requested.changed
    assert requested.task is not None
    assert requested.task["status"] == "PROCESSING"
    assert requested.task["cancel_requested"] is True

    # HEARTBEAT_INTERVAL is 0.3 s: a handful of heartbeats, far less than the 30 s sleep.
    row = await wait_status(pool, task_id, *TERMINAL, within=3.0, stack=stack)
    assert row["status"] == "CANCELLED"
    assert row["error"]["type"] == "Cancelled"
    assert row["cancel_requested"] is False
    assert row["finished_at"] is not None
    assert row["attempts"] == 1

    # The consumer is still there and still working.
    assert is_running(consumer), consumer.output
    follow_up = await new_task(pool, "echo", {"still": "alive"})
    assert (await wait_status(pool, follow_up, *TERMINAL, stack=stack))["status"] == "DONE"

    await stop_cleanly(consumer, relay)
    await assert_queues_empty(broker_settings)


# -- 2. ack only after commit, proven with a kill -------------------------------------


async def test_a_kill_between_commit_and_ack_redelivers_and_the_duplicate_is_dropped(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    relay = await stack.relay()
    doomed = await stack.consumer(TASKBOX_FAILPOINTS="consumer.after_commit")
    task_id = await new_task(pool, "echo", {"exactly": "once"})

    assert await doomed.wait(timeout=15) == 137, doomed.output
    assert "failpoint consumer.after_commit: killing the process" in doomed.output
    done = await fetch_task(pool, task_id)
    assert done["status"] == "DONE"  # committed...
    assert done["attempts"] == 1
    assert done["result"] == {"exactly": "once"}
    # ...but never acked: the broker put the message back when the process died.
    await wait_depth(broker_settings, broker_settings.queue_name, 1, stack)

    survivor = await stack.consumer(LOG_LEVEL="DEBUG")
    await survivor.wait_for("dropping duplicate delivery; task is DONE", timeout=10)
    await wait_depth(broker_settings, broker_settings.queue_name, 0, stack)
    after = await fetch_task(pool, task_id)
    for column in ("status", "attempts", "result", "finished_at", "updated_at", "worker_id"):
        assert after[column] == done[column], column

    await stop_cleanly(survivor, relay)
    await assert_queues_empty(broker_settings)


# -- 7. graceful shutdown -------------------------------------------------------------


async def test_sigterm_lets_a_running_task_finish_within_the_grace(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    relay = await stack.relay()
    consumer = await stack.consumer(SHUTDOWN_GRACE="10")
    task_id = await new_task(pool, "sleep", {"seconds": 5})
    await wait_status(pool, task_id, "PROCESSING", stack=stack)

    send(consumer, signal.SIGTERM)
    await consumer.wait_for("waiting up to 10s for 1 running tasks", timeout=5)
    assert is_running(consumer)
    assert (await fetch_task(pool, task_id))["status"] == "PROCESSING"
    assert await consumer.wait(timeout=15) == 0, consumer.output

    # A dead process writes nothing: DONE now means it committed before exiting.
    row = await fetch_task(pool, task_id)
    assert row["status"] == "DONE"
    assert row["result"] == {"slept": 5.0}
    assert row["attempts"] == 1
    await stop_cleanly(relay)
    await assert_queues_empty(broker_settings)


async def test_sigterm_past_the_grace_hands_the_task_back_untouched(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    relay = await stack.relay()
    first = await stack.consumer(SHUTDOWN_GRACE="0.5")
    task_id = await new_task(pool, "sleep", {"seconds": 30})
    await wait_status(pool, task_id, "PROCESSING", stack=stack)

    loop = asyncio.get_running_loop()
    asked = loop.time()
    send(first, signal.SIGTERM)
    assert await first.wait(timeout=10) == 0, first.output
    assert loop.time() - asked < 5, "the consumer did not give up after SHUTDOWN_GRACE"

    # Released through a new outbox row (its attempt given back), which the relay sends:
    # the old message is acked, so a stale copy of it cannot be what the task waits for.
    row = await wait_status(pool, task_id, "PENDING", stack=stack)
    assert row["attempts"] == 0
    assert row["heartbeat_at"] is None
    assert row["finished_at"] is None
    assert row["result"] is None
    assert await outbox_kinds(pool, task_id) == ["task.created", "task.retry"]
    await wait_depth(broker_settings, broker_settings.queue_name, 1, stack)

    second = await stack.consumer()
    claimed = await wait_status(pool, task_id, "PROCESSING", stack=stack)
    assert claimed["attempts"] == 1
    assert f":{pid(second)}:" in claimed["worker_id"]
    await cancel_task(pool, task_id)
    assert (await wait_status(pool, task_id, *TERMINAL, stack=stack))["status"] == "CANCELLED"

    await stop_cleanly(second, relay)
    await assert_queues_empty(broker_settings)


# -- 8. stuck-task rescue -------------------------------------------------------------


async def test_a_surviving_consumer_rescues_the_tasks_of_a_killed_one(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    relay = await stack.relay()
    victim = await stack.consumer()
    retried = await new_task(pool, "sleep", {"seconds": 3}, max_attempts=3)
    exhausted = await new_task(pool, "sleep", {"seconds": 3}, max_attempts=1)
    for task_id in (retried, exhausted):
        row = await wait_status(pool, task_id, "PROCESSING", stack=stack)
        assert f":{pid(victim)}:" in row["worker_id"]

    survivor = await stack.consumer()
    for task_id in (retried, exhausted):  # still mid-handler when the victim dies
        assert (await fetch_task(pool, task_id))["status"] == "PROCESSING"
    victim.kill()
    assert await victim.wait(timeout=5) == -signal.SIGKILL

    row = await wait_status(pool, retried, *TERMINAL, within=15, stack=stack)
    assert row["status"] == "DONE", row
    assert row["attempts"] == 2
    assert row["result"] == {"slept": 3.0}
    assert f":{pid(survivor)}:" in row["worker_id"]
    # Re-queued through a new outbox row, not by re-running a redelivered message.
    assert await outbox_kinds(pool, retried) == ["task.created", "task.retry"]

    row = await wait_status(pool, exhausted, *TERMINAL, within=10, stack=stack)
    assert row["status"] == "FAILED", row
    assert row["error"]["type"] == "WorkerLost"
    assert row["attempts"] == 1
    assert row["finished_at"] is not None
    # The rescue logs after its commit: the line may come a moment after the status.
    await survivor.wait_for("rescued a task whose consumer stopped heartbeating", timeout=10)

    # Not looping: a few more rescue sweeps change nothing.
    await asyncio.sleep(1.0)
    again = await fetch_task(pool, exhausted)
    assert (again["status"], again["attempts"], again["updated_at"]) == (
        "FAILED",
        1,
        row["updated_at"],
    )
    assert await outbox_kinds(pool, exhausted) == ["task.created"]

    await stop_cleanly(survivor, relay)
    await assert_queues_empty(broker_settings)


async def wait_heartbeat_stale(pool: asyncpg.Pool, task_id: uuid.UUID, stack: Stack) -> None:
    await eventually(
        lambda: pool.fetchval(
            "SELECT heartbeat_at < now() - make_interval(secs => $2) FROM tasks WHERE id = $1",
            task_id,
            STALE_AFTER + 0.2,
        ),
        lambda stale: stale is True,
        "the dead consumer's heartbeat to go stale",
        within=10,
        stack=stack,
    )


async def test_a_crash_exhausting_the_attempts_fails_the_task_when_a_consumer_restarts_later(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    # The only consumer dies mid-handler and is restarted after TASK_STALE_AFTER (a
    # supervisor's restart backoff, an OOM loop): the broker redelivers the unacked
    # message to it. Its claim must not run the stale task once more past max_attempts;
    # the rescue fails it with WorkerLost, so a task that crashes its consumer every
    # time cannot loop forever.
    relay = await stack.relay()
    victim = await stack.consumer()
    task_id = await new_task(pool, "sleep", {"seconds": 1}, max_attempts=1)
    await wait_status(pool, task_id, "PROCESSING", stack=stack)
    victim.kill()
    assert await victim.wait(timeout=5) == -signal.SIGKILL
    await wait_heartbeat_stale(pool, task_id, stack)

    restarted = await stack.consumer()
    row = await wait_status(pool, task_id, *TERMINAL, within=10, stack=stack)
    assert (row["status"], row["attempts"]) == ("FAILED", 1), (
        f"max_attempts=1 but the restarted consumer ran the task again: {dict(row)}; "
        f"outbox: {await outbox_kinds(pool, task_id)}\n{restarted.output}"
    )
    assert row["error"]["type"] == "WorkerLost"

    await stop_cleanly(restarted, relay)
    await assert_queues_empty(broker_settings)


async def test_a_cancel_requested_before_its_consumer_died_is_honoured_by_the_rescue(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    # A client cancels a running task (202, cancel requested) and its consumer dies
    # before a heartbeat sees the request. The rescue must honour the request: the task
    # goes straight to CANCELLED instead of being re-queued and started again.
    relay = await stack.relay()
    victim = await stack.consumer()
    task_id = await new_task(pool, "sleep", {"seconds": 30}, max_attempts=3)
    await wait_status(pool, task_id, "PROCESSING", stack=stack)
    survivor = await stack.consumer()  # alive before the kill: it drops the redelivery
    victim.kill()
    assert await victim.wait(timeout=5) == -signal.SIGKILL
    requested = await cancel_task(pool, task_id)
    assert requested.task is not None
    assert requested.task["status"] == "PROCESSING"
    assert requested.task["cancel_requested"] is True

    row = await wait_status(pool, task_id, *TERMINAL, within=10, stack=stack)
    # The rescue logs after its commit: the line may come a moment after the status.
    await survivor.wait_for("rescued a task whose consumer stopped heartbeating", timeout=10)
    assert row["status"] == "CANCELLED", dict(row)
    assert row["attempts"] == 1, f"a cancelled task was started again: {dict(row)}"

    await stop_cleanly(survivor, relay)
    await assert_queues_empty(broker_settings)


# -- 9. log lines a task cannot forge -------------------------------------------------

FORGED_LINE = "2026-01-01 00:00:00,000 CRITICAL consumer.worker: attempt committed: DONE"


async def test_a_task_error_message_cannot_forge_a_text_log_line(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, stack: Stack
) -> None:
    # The fail type's message is the client's text, logged by "attempt failed, no
    # attempts left: <message>"; with its newlines kept, a client writes its own lines.
    relay = await stack.relay()
    consumer = await stack.consumer(LOG_FORMAT="text")
    message = f"drill\n{FORGED_LINE}\r\n{FORGED_LINE}\u2028{FORGED_LINE}"
    task_id = await new_task(pool, "fail", {"message": message}, max_attempts=1)

    row = await wait_status(pool, task_id, "FAILED", stack=stack)
    assert row["error"]["message"] == message  # stored as given; only the log escapes
    await consumer.wait_for("attempt failed, no attempts left", timeout=10)
    await stop_cleanly(consumer, relay)

    forged = [line for line in consumer.output.splitlines() if line.startswith(FORGED_LINE)]
    assert forged == [], consumer.output
    (logged,) = [line for line in consumer.lines if "no attempts left" in line]
    assert f"drill\\n{FORGED_LINE}\\r\\n{FORGED_LINE}\\u2028{FORGED_LINE}" in logged
    assert f"task_id={task_id}" in logged  # the fields still follow, on the same line
