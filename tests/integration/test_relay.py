"""The outbox relay against the real Postgres and RabbitMQ.

In-process tests build the relay from its parts (``open_broker`` + ``OutboxRelay``) to
control each batch; process tests run ``python -m relay`` as an operator would.
Waiting is always a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
import pytest

from taskbox.broker import messages
from taskbox.broker.settings import BrokerSettings
from taskbox.db import execution, outbox
from taskbox.db.pool import create_pool
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, cancel_task, create_task
from taskbox.relay.publisher import BrokerUnavailable, OutboxPublisher
from taskbox.relay.relay import OutboxRelay, open_broker
from taskbox.relay.settings import RelaySettings
from tests.conftest import ADMIN_DSN
from tests.integration.helpers_broker import queue_depth, take_all, topology
from tests.integration.processes import ServiceProcess

# The relay's LISTEN connection: after connecting it has run LISTEN, and afterwards its
# self-check notifies itself with exactly this statement. The tests notify with a
# different text (``_WAKE``), so they never mistake their own connection for it.
_LISTENER_BACKENDS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'idle'
  AND (query LIKE 'LISTEN %' OR query = 'SELECT pg_notify($1, $2)')
ORDER BY pid
"""
_WAKE = "SELECT pg_notify($1, '')"

_OUTBOX = """
SELECT id, task_id, kind, published_at, publish_attempts, last_error, available_at
FROM outbox ORDER BY id
"""


# --------------------------------------------------------------------------- helpers


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.02
) -> None:
    """Poll ``check`` until it is true; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(every)


async def create_tasks(pool: asyncpg.Pool, count: int, *, prefix: str = "t") -> list[Any]:
    """``count`` tasks with their outbox rows, committed together (one transaction)."""
    async with pool.acquire() as conn, conn.transaction():
        return [
            await create_task(
                conn,
                NewTask(type=f"{prefix}{i % 3}", payload={"i": i}, priority=i % 10, max_attempts=3),
            )
            for i in range(count)
        ]


async def unpublished(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))


async def published_ids(pool: asyncpg.Pool) -> set[int]:
    rows = await pool.fetch("SELECT id FROM outbox WHERE published_at IS NOT NULL")
    return {r["id"] for r in rows}


async def outbox_ids_of(pool: asyncpg.Pool, tasks: list[Any]) -> set[int]:
    task_ids = [t["id"] for t in tasks]
    rows = await pool.fetch("SELECT id FROM outbox WHERE task_id = ANY($1::uuid[])", task_ids)
    return {r["id"] for r in rows}


async def all_ids(pool: asyncpg.Pool) -> list[int]:
    return [r["id"] for r in await pool.fetch("SELECT id FROM outbox ORDER BY id")]


async def statuses(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM tasks GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


async def listener_pids(pool: asyncpg.Pool) -> list[int]:
    return [r["pid"] for r in await pool.fetch(_LISTENER_BACKENDS)]


async def wait_for_listeners(pool: asyncpg.Pool, count: int, timeout: float = 10.0) -> list[int]:
    async def listening() -> bool:
        return len(await listener_pids(pool)) >= count

    await eventually(listening, timeout, f"{count} relay LISTEN connection(s)")
    return await listener_pids(pool)


async def wake(pool: asyncpg.Pool, channel: str) -> None:
    await pool.execute(_WAKE, channel)


def message_ids(taken: list[aio_pika.abc.AbstractIncomingMessage]) -> list[int]:
    ids = []
    for message in taken:
        assert message.message_id is not None
        ids.append(int(message.message_id))
    return ids


def published_count(relay: ServiceProcess) -> int:
    """The total the relay logs when it stops."""
    found = re.search(r"relay stopped; published (\d+) rows", relay.output)
    assert found, relay.output
    return int(found.group(1))


@pytest.fixture
def relay_settings(db_settings: DatabaseSettings, broker_settings: BrokerSettings) -> RelaySettings:
    return RelaySettings(
        database_url=db_settings.database_url,
        outbox_channel=db_settings.outbox_channel,
        amqp_url=broker_settings.amqp_url,
        exchange_name=broker_settings.exchange_name,
        queue_name=broker_settings.queue_name,
        dead_letter_exchange=broker_settings.dead_letter_exchange,
        dead_letter_queue=broker_settings.dead_letter_queue,
        relay_batch_size=100,
        relay_publish_timeout=5.0,
        relay_retry_base_delay=20.0,
        relay_retry_max_delay=20.0,
    )


@dataclass
class InProcessRelay:
    relay: OutboxRelay
    publisher: OutboxPublisher


@asynccontextmanager
async def in_process_relay(
    settings: RelaySettings, pool: asyncpg.Pool
) -> AsyncIterator[InProcessRelay]:
    connection, publisher = await open_broker(settings)
    try:
        yield InProcessRelay(OutboxRelay(pool, publisher, settings, asyncio.Event()), publisher)
    finally:
        await connection.close()


@asynccontextmanager
async def relay_processes(
    env: dict[str, str], count: int = 1, **extra_env: str
) -> AsyncIterator[list[ServiceProcess]]:
    """``count`` relay processes started together; killed on the way out if still running."""
    relays = [ServiceProcess("relay", env, **extra_env) for _ in range(count)]
    try:
        await asyncio.gather(*(r.start() for r in relays))
        yield relays
    finally:
        for r in relays:
            r.kill()
        for r in relays:
            if r.proc is not None:
                await r.wait()


# ------------------------------------------------------------------------------ tests


async def test_one_relay_drains_a_backlog_in_batches(
    pool: asyncpg.Pool, relay_settings: RelaySettings
) -> None:
    tasks = {t["id"]: t for t in await create_tasks(pool, 1200)}
    async with in_process_relay(relay_settings, pool) as r:
        async with asyncio.timeout(30):
            await r.relay.drain(asyncio.Event())
    assert (r.relay.published_total, r.relay.refused_total) == (1200, 0)

    rows = await pool.fetch(_OUTBOX)
    assert len(rows) == 1200
    assert all(row["published_at"] is not None for row in rows)
    assert {row["publish_attempts"] for row in rows} == {1}
    assert {row["last_error"] for row in rows} == {None}
    # published_at is now() of the batch's transaction: one value per batch of 100.
    batches = Counter(row["published_at"] for row in rows)
    assert sorted(batches.values()) == [100] * 12
    assert await statuses(pool) == {"PENDING": 1200}

    taken = await take_all(relay_settings)
    ids = [row["id"] for row in rows]
    # Exactly one message per row. Several batches are in flight at once while a
    # backlog drains (RELAY_CONCURRENCY), so batches may interleave on the channel; the
    # order inside each batch of 100 is kept among messages of one priority (the queue
    # delivers higher priorities first).
    assert sorted(message_ids(taken)) == ids
    batch_of = {row["id"]: row["published_at"] for row in rows}
    priority_of = dict(zip(message_ids(taken), (m.priority for m in taken), strict=True))
    for published_at in batches:
        for priority in range(10):
            in_batch = [
                i
                for i in message_ids(taken)
                if batch_of[i] == published_at and priority_of[i] == priority
            ]
            assert in_batch == sorted(in_batch)
    by_id = {row["id"]: row for row in rows}
    for message in taken:
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
        parsed = messages.parse(message.body)
        row = by_id[parsed.outbox_id]
        assert str(parsed.outbox_id) == message.message_id
        assert parsed.task_id == row["task_id"]
        assert parsed.kind == row["kind"] == "task.created" == message.type
        assert parsed.type == tasks[row["task_id"]]["type"]
        assert message.priority == tasks[row["task_id"]]["priority"]


async def test_two_relay_processes_never_publish_a_row_twice(
    pool: asyncpg.Pool,
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
) -> None:
    async with relay_processes(
        service_env, 2, RELAY_BATCH_SIZE="50", RELAY_POLL_INTERVAL="0.2"
    ) as relays:
        await wait_for_listeners(pool, 2)
        # The whole backlog appears at once and one NOTIFY wakes both relays together.
        await create_tasks(pool, 1200)
        await wake(pool, db_settings.outbox_channel)

        async def drained() -> bool:
            return await unpublished(pool) == 0

        await eventually(drained, 30, "backlog drained by two relays")
        codes = [await r.stop(signal.SIGTERM) for r in relays]
    assert codes == [0, 0], [r.output for r in relays]

    counts = [published_count(r) for r in relays]
    assert sum(counts) == 1200, counts
    assert all(c > 0 for c in counts), f"the relays did not drain concurrently: {counts}"
    ids = await all_ids(pool)
    per_id = Counter(message_ids(await take_all(broker_settings)))
    assert [i for i, n in per_id.items() if n > 1] == [], "published twice"
    assert sorted(per_id) == ids
    rows = await pool.fetch(_OUTBOX)
    assert {row["publish_attempts"] for row in rows} == {1}
    assert await statuses(pool) == {"PENDING": 1200}


async def test_notify_wakes_the_relay_long_before_its_poll(
    pool: asyncpg.Pool,
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
) -> None:
    async with relay_processes(service_env, RELAY_POLL_INTERVAL="30") as (relay,):
        await wait_for_listeners(pool, 1)
        # The listener wakes the drain once it has listened on all its channels (the
        # webhook one too), a few round trips after its backend shows up: let that
        # wake-up pass, or it would publish the task below without the NOTIFY.
        await asyncio.sleep(0.5)
        (task,) = await create_tasks(pool, 1)
        # Without a NOTIFY nothing happens: the poll is 30 s away.
        await asyncio.sleep(0.5)
        assert await unpublished(pool) == 1, relay.output

        await wake(pool, db_settings.outbox_channel)

        async def published() -> bool:
            return await unpublished(pool) == 0

        await eventually(published, 2.0, "publish after NOTIFY")
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
    (message,) = await take_all(broker_settings)
    assert messages.parse(message.body).task_id == task["id"]


async def test_poll_alone_publishes_when_listen_is_off(
    pool: asyncpg.Pool, broker_settings: BrokerSettings, service_env: dict[str, str]
) -> None:
    async with relay_processes(service_env, RELAY_LISTEN="false", RELAY_POLL_INTERVAL="0.3") as (
        relay,
    ):
        assert "LISTEN off" in relay.output
        (task,) = await create_tasks(pool, 1)

        async def published() -> bool:
            return await unpublished(pool) == 0

        await eventually(published, 2.0, "publish by the poll")
        assert await listener_pids(pool) == [], "LISTEN is off, yet a backend listens"
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
    (message,) = await take_all(broker_settings)
    assert messages.parse(message.body).task_id == task["id"]


async def test_listen_connection_is_reestablished_after_its_backend_is_terminated(
    pool: asyncpg.Pool,
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
) -> None:
    async with relay_processes(
        service_env, RELAY_POLL_INTERVAL="30", RELAY_LISTEN_CHECK_INTERVAL="2"
    ) as (relay,):
        (old,) = await wait_for_listeners(pool, 1)
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", old)
        await relay.wait_for("LISTEN connection re-established", timeout=10)
        (new,) = await wait_for_listeners(pool, 1)
        assert new != old
        # The reconnect itself wakes one drain; let it pass before the real check.
        await asyncio.sleep(0.3)
        (task,) = await create_tasks(pool, 1)
        await asyncio.sleep(0.5)
        assert await unpublished(pool) == 1, "published without a NOTIFY: the test proves nothing"

        await wake(pool, db_settings.outbox_channel)

        async def published() -> bool:
            return await unpublished(pool) == 0

        await eventually(published, 2.0, "publish after NOTIFY on the new LISTEN connection")
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
    (message,) = await take_all(broker_settings)
    assert messages.parse(message.body).task_id == task["id"]


async def test_unroutable_rows_are_refused_with_backoff_and_do_not_block_later_rows(
    pool: asyncpg.Pool, relay_settings: RelaySettings
) -> None:
    async with in_process_relay(relay_settings, pool) as r, topology(relay_settings) as topo:
        # No binding: the mandatory publish comes back as a return.
        await topo.queue.unbind(topo.exchange, routing_key=topo.routing_key)
        first = await create_tasks(pool, 3, prefix="first")
        before = await pool.fetchval("SELECT now()")
        assert await r.relay.drain_batch() == 3
        after = await pool.fetchval("SELECT clock_timestamp()")
        assert (r.relay.published_total, r.relay.refused_total) == (0, 3)

        rows = await pool.fetch(_OUTBOX)
        for row in rows:
            assert row["published_at"] is None
            assert row["publish_attempts"] == 1
            assert row["last_error"], row
            # Backoff of the first attempt: base 20 s with full jitter in [10, 20] s.
            assert (row["available_at"] - before).total_seconds() >= 10, row
            assert (row["available_at"] - after).total_seconds() <= 20, row
        assert await statuses(pool) == {"NEW": 3}, "refused rows' tasks must go back to NEW"
        assert await queue_depth(relay_settings) == 0
        assert await queue_depth(relay_settings, relay_settings.dead_letter_queue) == 0
        # Not due until the backoff ends: the relay does not spin on them.
        assert await r.relay.drain_batch() == 0

        await topo.queue.bind(topo.exchange, routing_key=topo.routing_key)
        later = await create_tasks(pool, 5, prefix="later")
        assert await r.relay.drain_batch() == 5
        assert await published_ids(pool) == await outbox_ids_of(pool, later)
        assert await statuses(pool) == {"NEW": 3, "PENDING": 5}

        # Once their backoff is over, the refused rows go out like any other.
        await pool.execute("UPDATE outbox SET available_at = now() WHERE published_at IS NULL")
        assert await r.relay.drain_batch() == 3
    rows = await pool.fetch(_OUTBOX)
    first_ids = await outbox_ids_of(pool, first)
    for row in rows:
        assert row["published_at"] is not None
        assert row["last_error"] is None
        assert row["publish_attempts"] == (2 if row["id"] in first_ids else 1)
    assert await statuses(pool) == {"PENDING": 8}
    assert sorted(message_ids(await take_all(relay_settings))) == await all_ids(pool)


async def test_a_row_whose_headers_amqp_cannot_carry_is_refused_alone(
    pool: asyncpg.Pool, relay_settings: RelaySettings
) -> None:
    # jsonb holds numbers AMQP field tables as pamqp writes them cannot (floats past 32
    # bits). No api path writes such headers; a hand-written or
    # replayed row could, and it must not stall the relay by failing every batch.
    async with in_process_relay(relay_settings, pool) as r:
        await create_tasks(pool, 4)
        ids = await all_ids(pool)
        # pamqp packs a float as 32 bits; jsonb also hands integers past 64 bits to the
        # codec as floats. Written as text, as a hand-made row would be.
        unencodable = {ids[0]: '{"big": 1e300}', ids[1]: '{"deep": {"x": [1, 1e39]}}'}
        for outbox_id, headers in unencodable.items():
            await pool.execute(
                "UPDATE outbox SET headers = $2::text::jsonb WHERE id = $1", outbox_id, headers
            )
        assert await r.relay.drain_batch() == 4
        assert (r.relay.published_total, r.relay.refused_total) == (2, 2)
        rows = {row["id"]: row for row in await pool.fetch(_OUTBOX)}
        for outbox_id in ids[:2]:
            assert rows[outbox_id]["last_error"].startswith("OverflowError"), rows[outbox_id]
        assert [rows[i]["publish_attempts"] for i in ids] == [1, 1, 1, 1]
        assert [rows[i]["published_at"] is not None for i in ids] == [False, False, True, True]
        # The channel is fine: later rows go out on it.
        later = await create_tasks(pool, 2, prefix="later")
        assert await r.relay.drain_batch() == 2
    expected = set(ids[2:]) | await outbox_ids_of(pool, later)
    assert sorted(message_ids(await take_all(relay_settings))) == sorted(expected)


async def test_lost_channel_rolls_the_batch_back_without_charging_the_rows(
    pool: asyncpg.Pool, relay_settings: RelaySettings
) -> None:
    async with in_process_relay(relay_settings, pool) as r:
        # Publishing to a missing exchange makes the broker close the relay's channel.
        async with topology(relay_settings) as topo:
            await topo.exchange.delete()
        await create_tasks(pool, 5)
        with pytest.raises(BrokerUnavailable):
            await r.relay.drain_batch()
        rows = await pool.fetch(
            "SELECT published_at, publish_attempts, last_error, available_at <= now() AS due"
            " FROM outbox"
        )
        assert len(rows) == 5
        for row in rows:
            assert dict(row) == {
                "published_at": None,
                "publish_attempts": 0,
                "last_error": None,
                "due": True,
            }, "an outage must not count as the row's attempt or delay it"
        assert await statuses(pool) == {"NEW": 5}

        # The exchange is back (as any relay or consumer declares it); so is the
        # robust channel, after a moment: the same rows go out.
        async with topology(relay_settings):
            pass

        async def drained() -> bool:
            with contextlib.suppress(BrokerUnavailable):
                await r.relay.drain_batch()
            return await unpublished(pool) == 0

        await eventually(drained, 15, "the rows go out on the restored channel", every=0.2)
    rows = await pool.fetch(_OUTBOX)
    assert {(row["publish_attempts"], row["last_error"]) for row in rows} == {(1, None)}
    assert await statuses(pool) == {"PENDING": 5}
    assert sorted(message_ids(await take_all(relay_settings))) == await all_ids(pool)


async def test_crash_between_publish_and_commit_duplicates_and_never_loses(
    pool: asyncpg.Pool, relay_settings: RelaySettings
) -> None:
    await create_tasks(pool, 300)
    async with in_process_relay(relay_settings, pool) as r:
        # The relay's own steps, up to the commit that never comes.
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            claimed = (await outbox.claim_batch(conn, 100)).rows
            report = await r.publisher.publish_batch(claimed)
            await transaction.rollback()
        rolled_back = [row["id"] for row in claimed]
        assert report.published == rolled_back and report.refused == []
        assert await unpublished(pool) == 300
        assert await statuses(pool) == {"NEW": 300}, "the NEW -> PENDING flip must roll back"

        async with asyncio.timeout(30):
            await r.relay.drain(asyncio.Event())
    assert await unpublished(pool) == 0
    per_id = Counter(message_ids(await take_all(relay_settings)))
    ids = await all_ids(pool)
    assert sorted(per_id) == ids, "a row is missing from the queue"
    assert {i for i, n in per_id.items() if n == 2} == set(rolled_back)
    assert {n for i, n in per_id.items() if i not in rolled_back} == {1}
    assert await statuses(pool) == {"PENDING": 300}


async def test_relay_killed_mid_drain_loses_nothing(
    pool: asyncpg.Pool,
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
) -> None:
    env = {**service_env, "RELAY_BATCH_SIZE": "50", "RELAY_POLL_INTERVAL": "30"}
    async with relay_processes(env) as (victim,):
        await wait_for_listeners(pool, 1)
        await create_tasks(pool, 3000)
        await wake(pool, db_settings.outbox_channel)

        async def started() -> bool:
            return await unpublished(pool) < 3000

        await eventually(started, 10, "the relay starts draining", every=0.005)
        victim.kill()
        assert await victim.wait() == -signal.SIGKILL
    left = await unpublished(pool)
    assert left > 0, "the relay finished before the kill: the test proves nothing"

    async with relay_processes(env) as (survivor,):

        async def drained() -> bool:
            return await unpublished(pool) == 0

        # The start drains once without a NOTIFY.
        await eventually(drained, 30, "the second relay drains the rest")
        assert await survivor.stop(signal.SIGTERM) == 0, survivor.output
    per_id = Counter(message_ids(await take_all(broker_settings)))
    assert sorted(per_id) == await all_ids(pool), "a row is missing from the queue"
    # Only the batch in flight at the kill can come twice.
    assert sum(n - 1 for n in per_id.values()) <= 50, per_id.most_common(3)
    assert await statuses(pool) == {"PENDING": 3000}


async def test_sigterm_stops_an_idle_relay_promptly(
    pool: asyncpg.Pool, service_env: dict[str, str]
) -> None:
    async with relay_processes(service_env, RELAY_POLL_INTERVAL="30") as (relay,):
        await wait_for_listeners(pool, 1)
        started = time.monotonic()
        assert await relay.stop(signal.SIGTERM, timeout=10) == 0, relay.output
        assert time.monotonic() - started < 3.0, relay.output
    assert "relay stopped; published 0 rows" in relay.output

    async def listener_gone() -> bool:
        return await listener_pids(pool) == []

    await eventually(listener_gone, 5, "the LISTEN connection closes with the relay")


async def test_sigterm_mid_drain_commits_the_batch_in_flight(
    pool: asyncpg.Pool,
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    service_env: dict[str, str],
) -> None:
    async with relay_processes(service_env, RELAY_BATCH_SIZE="50", RELAY_POLL_INTERVAL="30") as (
        relay,
    ):
        await wait_for_listeners(pool, 1)
        await create_tasks(pool, 3000)
        await wake(pool, db_settings.outbox_channel)

        async def started() -> bool:
            return await unpublished(pool) < 3000

        await eventually(started, 10, "the relay starts draining", every=0.005)
        stopping = time.monotonic()
        assert await relay.stop(signal.SIGTERM, timeout=10) == 0, relay.output
        assert time.monotonic() - stopping < 3.0, relay.output
    done = await published_ids(pool)
    assert 0 < len(done) < 3000, "the stop did not land mid-drain: the test proves nothing"
    assert published_count(relay) == len(done)
    # The batch in flight was finished and committed: the queue holds exactly the
    # published rows, no message of a rolled-back batch.
    assert sorted(message_ids(await take_all(broker_settings))) == sorted(done)


async def test_relay_survives_the_database_refusing_connections_for_a_moment(
    db_settings: DatabaseSettings, broker_settings: BrokerSettings, service_env: dict[str, str]
) -> None:
    # A Postgres restart refuses new connections for a moment ("the database system is
    # shutting down / starting up", 57P03). The relay must back off and carry on, not
    # die. The shared server cannot be restarted here, so the test makes its own database
    # refuse new connections (datallowconn = false: 55000), which takes the same path
    # through the pool.
    #
    # This test's own connections carry a name, so that it terminates only the relay's.
    pool = await create_pool(db_settings, server_settings={"application_name": "relay-test"})
    try:
        async with relay_processes(service_env, RELAY_POLL_INTERVAL="0.1") as (relay,):
            (listener,) = await wait_for_listeners(pool, 1)
            database = await pool.fetchval("SELECT current_database()")
            admin = await asyncpg.connect(ADMIN_DSN)
            try:
                await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
                # Drop the relay's pooled connections: its next poll must open new ones.
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = $1 AND pid <> $2 AND application_name <> 'relay-test'",
                    database,
                    listener,
                )

                async def refused_or_exited() -> bool:
                    assert relay.proc is not None
                    return relay.proc.returncode is not None or "drain failed" in relay.output

                await eventually(refused_or_exited, 5, "the relay meets the refusal")
            finally:
                await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
                await admin.close()
            assert relay.proc is not None
            assert relay.proc.returncode is None, f"the relay died:\n{relay.output}"

            (task,) = await create_tasks(pool, 1)

            async def published() -> bool:
                return await unpublished(pool) == 0

            await eventually(published, 5, "publish once connections are allowed again")
            assert await relay.stop(signal.SIGTERM) == 0, relay.output
    finally:
        await pool.close()
    (message,) = await take_all(broker_settings)
    assert messages.parse(message.body).task_id == task["id"]


async def test_a_cancel_during_a_publish_neither_waits_nor_is_undone_by_its_record(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    (task,) = await create_tasks(pool, 1)
    relay = await asyncpg.connect(db_settings.database_url)
    try:
        transaction = relay.transaction()
        await transaction.start()
        # The claim locks the outbox row only: the task row is free while the relay
        # publishes, so a cancel (and a consumer's claim) goes through at once ...
        claim = await outbox.claim_batch(relay, 10)
        assert [row["task_id"] for row in claim.rows] == [task["id"]]
        async with asyncio.timeout(2):
            outcome = await cancel_task(pool, task["id"])
        assert outcome.task is not None and outcome.task["status"] == "CANCELLED"
        # ... and the relay's record of the confirm flips only a task still NEW.
        async with asyncio.timeout(5):
            await outbox.record_publish_outcome(relay, [claim.rows[0]["id"]], [])
            await transaction.commit()
    finally:
        await relay.close()
    assert await statuses(pool) == {"CANCELLED": 1}


async def test_a_task_cancelled_before_publication_is_closed_unsent(pool: asyncpg.Pool) -> None:
    cancelled, kept = await create_tasks(pool, 2)
    assert (await cancel_task(pool, cancelled["id"])).changed
    async with pool.acquire() as conn, conn.transaction():
        claim = await outbox.claim_batch(conn, 10)
    assert claim.claimed == 2
    assert [row["task_id"] for row in claim.rows] == [kept["id"]]
    closed = await pool.fetchrow(
        "SELECT published_at, last_error FROM outbox WHERE task_id = $1", cancelled["id"]
    )
    assert closed["published_at"] is not None
    assert closed["last_error"] == "not sent: task CANCELLED"
    # the kept one goes PENDING only when its confirm is recorded, not by the claim
    assert await statuses(pool) == {"CANCELLED": 1, "NEW": 1}


async def test_a_confirm_recorded_late_does_not_mark_a_retried_task_pending(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    """The relay flips NEW -> PENDING when it records the confirm; a consumer may have
    claimed the task from that very message and sent it back to NEW with a retry row
    before then. The task must stay NEW, waiting for its retry row."""
    (task,) = await create_tasks(pool, 1)
    relay = await asyncpg.connect(db_settings.database_url)
    try:
        transaction = relay.transaction()
        await transaction.start()
        (row,) = (await outbox.claim_batch(relay, 10)).rows
        # the message reached a consumer before the relay recorded the confirm
        (claim,) = await execution.claim_tasks(
            pool, [execution.Delivery(task["id"], row["id"])], "worker-a", 30.0
        )
        assert claim["claimed"], claim
        retry = execution.Outcome(
            task["id"],
            1,
            "NEW",
            error={"type": "X", "message": "x"},
            retry_in=3600,
            lease=claim["lease"],
        )
        assert await execution.finish_tasks(pool, [retry], "worker-a") == {task["id"]: "NEW"}
        await outbox.record_publish_outcome(relay, [row["id"]], [])
        await transaction.commit()
    finally:
        await relay.close()
    assert await statuses(pool) == {"NEW": 1}


async def record_and_commit(
    relay: asyncpg.Connection, transaction: Any, published: list[int]
) -> None:
    await outbox.record_publish_outcome(relay, published, [])
    await transaction.commit()


async def test_the_relays_flip_and_a_consumers_claim_do_not_deadlock(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    """Both lock several task rows: the relay's record of a batch and a consumer's claim
    of the same tasks' messages, which arrive in an order of their own. The relay's flip
    skips the rows the claim holds instead of waiting, so neither waits on the other in
    a cycle (Postgres would abort one after deadlock_timeout)."""
    for _ in range(10):
        tasks = await create_tasks(pool, 100)
        relay = await asyncpg.connect(db_settings.database_url)
        consumer = await asyncpg.connect(db_settings.database_url)
        try:
            transaction = relay.transaction()
            await transaction.start()
            rows = (await outbox.claim_batch(relay, 100)).rows
            deliveries = [execution.Delivery(r["task_id"], r["id"]) for r in reversed(rows)]

            async with asyncio.timeout(10):
                _, claims = await asyncio.gather(
                    record_and_commit(relay, transaction, [r["id"] for r in rows]),
                    execution.claim_tasks(consumer, deliveries, "worker-b", 30.0),
                )
            assert all(c["claimed"] for c in claims)
        finally:
            await relay.close()
            await consumer.close()
        assert await statuses(pool) == {"PROCESSING": len(tasks)}
        await pool.execute("DELETE FROM outbox; DELETE FROM tasks")
