"""A Postgres primary failover under load: SIGKILL the primary, promote its synchronous
standby, and Taskbox carries on by itself, losing nothing it acknowledged.

The test runs a primary and a hot standby of its own on loopback (tests/faults/
own_postgres.py), streaming through a replication slot, the standby named in the
primary's ``synchronous_standby_names`` so that a commit is acknowledged only once the
standby has it. Every Taskbox process knows both hosts:
``postgresql://h1,h2/taskbox?target_session_attrs=read-write`` connects to whichever
accepts writes. Creates arrive over HTTP at a steady rate; the primary's postmaster
and all its children are killed with SIGKILL (a dead machine: a commit waiting for its
standby gets no answer at all). Just before, the primary's WAL sender is frozen for a
moment, so that creates, claims and outcomes are waiting for the standby when the
primary dies and their WAL dies with it: the worst moment. After a failover manager's
detection delay the standby is promoted. Then:

- every 201 is on the new primary, by id (the synchronous standby's promise);
- during the switch the api answered 503 with Retry-After, never a 500, and no request
  went unanswered;
- relays and consumers found the new primary by themselves, the relay's LISTEN too:
  it polls only every RELAY_POLL_INTERVAL (long here), so the tasks created after the
  switch start within a fraction of that only if its notifications arrive;
- commits whose outcome the failure hid resolve as everywhere else (a duplicate, never
  a loss): every task reaches a terminal state, no outcome was written twice, no stale
  owner wrote one (the fault suite's audit): ``lost=0 stuck=0``.

It prints the switch time: from the kill to the first 201 after the promotion. With
an asynchronous standby (``synchronous_standby_names`` empty) it fails: the 201s
answered while the WAL sender was frozen are lost.

A second test turns a server read-only under open connections (no failover tool
needed to see it): every process must move to the next host of the list that accepts
writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from taskbox.broker.settings import BrokerSettings
from tests.faults import recorder
from tests.faults.cluster import (
    STALE_WRITES,
    TERMINAL,
    TERMINAL_WRITTEN_TWICE,
    Cluster,
    install_audit,
    wait_until,
)
from tests.faults.load import Answer, SteadyLoad, accepted, refused_wrongly
from tests.faults.own_postgres import OwnPostgres
from tests.integration.processes import run_command

pytestmark = pytest.mark.integration

STANDBY = "taskbox_standby"
RATE = 100  # creates a second
# The primary dies once this many creates were answered 201 (how long that takes
# depends on the machine's other load)
ACCEPTED_BEFORE = 150
FROZEN = 0.3  # the WAL sender to the standby is stopped this long before the kill
DETECTION = 0.5  # a failover manager's delay between the death and the promotion
LOAD_AFTER = 4.0  # seconds of load after the promotion
# The relay's poll, the safety net under LISTEN: long, so that only working
# notifications start the tasks created after the switch quickly.
RELAY_POLL = 10.0
SETTLED_AFTER = 1.5  # seconds after the promotion by which every process is back


@pytest.fixture
async def replicated() -> AsyncIterator[tuple[OwnPostgres, OwnPostgres]]:
    """A primary and its synchronous standby; both stopped and deleted afterwards."""
    primary = OwnPostgres("primary", synchronous_standby_names=STANDBY)
    standby: OwnPostgres | None = None
    try:
        await asyncio.to_thread(primary.create)
        standby = await asyncio.to_thread(primary.standby, STANDBY)
        yield primary, standby
    finally:
        await asyncio.to_thread(primary.destroy)
        if standby is not None:
            await asyncio.to_thread(standby.destroy)


def process_env(dsn: str, broker: BrokerSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TASKBOX_FAILPOINTS"}
    env.update(
        DATABASE_URL=dsn,
        AMQP_URL=broker.amqp_url,
        EXCHANGE_NAME=broker.exchange_name,
        QUEUE_NAME=broker.queue_name,
        DEAD_LETTER_EXCHANGE=broker.dead_letter_exchange,
        DEAD_LETTER_QUEUE=broker.dead_letter_queue,
        PYTHONUNBUFFERED="1",
    )
    return env


async def sync_state(primary: OwnPostgres) -> list[str]:
    conn = await asyncpg.connect(primary.url.replace("/taskbox", "/postgres"))
    try:
        rows = await conn.fetch("SELECT application_name, sync_state FROM pg_stat_replication")
    finally:
        await conn.close()
    return [f"{row['application_name']}={row['sync_state']}" for row in rows]


async def every_task_settled(
    dsn: str, ids: list[uuid.UUID]
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """(ids answered 201 but missing, ids of tasks not terminal)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, status FROM tasks")
    finally:
        await conn.close()
    status = {row["id"]: row["status"] for row in rows}
    return [i for i in ids if i not in status], [i for i, s in status.items() if s not in TERMINAL]


async def test_a_primary_failover_loses_no_acknowledged_task_and_strands_none(
    replicated: tuple[OwnPostgres, OwnPostgres],
    broker_settings: BrokerSettings,
    fault_report: Callable[[str], None],
    tmp_path: Path,
) -> None:
    primary, standby = replicated
    await wait_until(
        lambda: sync_state(primary), lambda s: s == [f"{STANDBY}=sync"], "standby in sync", 20
    )
    dsn = (
        f"postgresql://postgres@{primary.host},{standby.host}/taskbox"
        "?target_session_attrs=read-write"
    )
    executions = tmp_path / "executions"
    env = process_env(dsn, broker_settings)
    # alembic (through SQLAlchemy) reads the list of hosts too
    migrated = await run_command("db", ["migrate"], env)
    assert migrated.code == 0, migrated
    conn = await asyncpg.connect(dsn)
    try:
        await install_audit(conn)
    finally:
        await conn.close()

    procs = Cluster(env)
    running: asyncio.Task[list[Answer]] | None = None
    try:
        _, base_url = await procs.api()
        relay = await procs.relay(RELAY_POLL_INTERVAL=str(RELAY_POLL))
        consumers = [
            await procs.consumer(
                TASK_MODULES=recorder.__name__, TASKBOX_EXECUTION_LOG=str(executions)
            )
            for _ in range(2)
        ]

        load = SteadyLoad(base_url, RATE)
        running = asyncio.create_task(load.run())

        async def accepted_so_far() -> int:
            return load.accepted()

        await wait_until(
            accepted_so_far,
            lambda n: n >= ACCEPTED_BEFORE,
            f"{ACCEPTED_BEFORE} creates answered 201",
            30,
            0.05,
            procs.logs,
        )
        # The worst moment: commits waiting for the standby when the primary dies, their
        # outcome unknown to whoever sent them (the api's creates, the consumers' claims
        # and outcomes), and their WAL lost with it. The primary's WAL sender is frozen,
        # then killed with the rest: what it had not sent never reaches the standby.
        sender = await asyncio.to_thread(primary.wal_sender, STANDBY)
        os.kill(sender, signal.SIGSTOP)
        try:
            await asyncio.sleep(FROZEN)
            killed_at = time.monotonic()
            await asyncio.to_thread(primary.kill)
        finally:  # (gone after the kill; left stopped, it would hang the teardown's stop)
            with contextlib.suppress(ProcessLookupError):
                os.kill(sender, signal.SIGCONT)
        await asyncio.sleep(DETECTION)
        promoting_at = time.monotonic()
        await asyncio.to_thread(standby.promote)
        promoted_at = time.monotonic()
        await asyncio.sleep(LOAD_AFTER)
        load.stop.set()
        answers = await running

        # The client's view: 201 or 503 + Retry-After, and the api back after the switch.
        wrong = refused_wrongly(answers)
        assert wrong == [], f"{len(wrong)} answers neither 201 nor 503+Retry-After: {wrong[:3]}"
        ids = accepted(answers)
        before = [a.task_id for a in answers if a.status == 201 and a.answered_at < killed_at]
        after = [a for a in answers if a.status == 201 and a.answered_at > promoted_at]
        assert len(before) >= ACCEPTED_BEFORE
        assert after, "the api never answered 201 after the promotion"
        switch = min(a.answered_at for a in after) - killed_at
        unavailable = sum(1 for a in answers if a.status == 503)
        # Creates in flight at the kill: sent before it, answered after it.
        in_flight = {a.n: a.status for a in answers if a.sent_at < killed_at < a.answered_at}

        # Every 201 is on the new primary, by id; every task ends; none twice, none stale.
        new_primary = standby.url
        lost, stuck = await wait_until(
            lambda: every_task_settled(new_primary, ids),
            lambda v: bool(v[0]) or not v[1],
            "every task terminal on the new primary",
            30,
            0.5,
            procs.logs,
        )
        conn = await asyncpg.connect(new_primary)
        try:
            in_recovery = await conn.fetchval("SELECT pg_is_in_recovery()")
            twice = await conn.fetch(TERMINAL_WRITTEN_TWICE)
            stale = await conn.fetch(STALE_WRITES)
            statuses = Counter(r["status"] for r in await conn.fetch("SELECT status FROM tasks"))
            # An unknown outcome that was in fact committed: the client saw no 201 but the
            # task exists (and runs); its retry would be the duplicate.
            unacknowledged = await conn.fetchval(
                "SELECT count(*) FROM tasks WHERE (payload->>'n')::int = ANY($1::int[])",
                [n for n, status in in_flight.items() if status != 201],
            )
            # Started how long after its create, for tasks created once every process
            # was back: LISTEN's doing, if well under the relay's poll interval.
            latency, settled_tasks = await conn.fetchrow(
                "SELECT extract(epoch FROM max(started_at - created_at)), count(*) FROM tasks"
                " WHERE created_at > now() - make_interval(secs => $1)",
                time.monotonic() - promoted_at - SETTLED_AFTER,
            )
        finally:
            await conn.close()
        runs = Counter(task_id for task_id, _, _ in recorder.read(str(executions)))
        duplicates = sum(n - 1 for n in runs.values() if n > 1)
        listen_back = relay.output.count("LISTEN connection re-established")

        fault_report(
            f"postgres failover: accepted={len(ids)} (before the kill {len(before)})"
            f" lost={len(lost)} stuck={len(stuck)} results_committed_twice={len(twice)}"
            f" stale_writes={len(stale)} duplicate_executions={duplicates}"
            f" outcomes={dict(statuses)}"
        )
        fault_report(
            f"postgres failover: switch={switch:.2f}s (kill -> first 201 after the promote:"
            f" detection {promoting_at - killed_at:.2f}s, promote"
            f" {promoted_at - promoting_at:.2f}s, back {switch - (promoted_at - killed_at):.2f}s)"
            f" 503s={unavailable}"
            f" in_flight_at_kill={dict(Counter(in_flight.values()))}"
            f" committed_without_201={unacknowledged} listen_reconnects={listen_back}"
            f" start_latency_after_switch={latency or 0:.2f}s (max of {settled_tasks})"
        )
        assert not in_recovery, "the promoted standby still is a standby"
        assert unavailable > 0, "no 503 at all: the switch was never seen by a client"
        assert lost == [], f"{len(lost)} tasks answered 201 are not on the new primary"
        assert stuck == [], f"{len(stuck)} tasks never finished: {stuck[:5]}"
        assert twice == [], [dict(r) for r in twice[:5]]
        assert stale == [], [dict(r) for r in stale[:5]]
        assert listen_back >= 1, relay.output
        assert latency is not None, "no task was created after the switch settled"
        assert latency < RELAY_POLL / 4, "tasks waited for the relay's poll: LISTEN is dead"
        # The operator's screen reads the same list of hosts and finds the new primary.
        status = await run_command("relay", ["status"], env)
        assert status.code == 0, status
        assert f"postgres {primary.host},{standby.host}/taskbox" in status.stdout, status
        assert f"DONE {len(ids) + unacknowledged}" in status.stdout, status
        for proc in (relay, *consumers):
            assert proc.proc is not None and proc.proc.returncode is None, proc.output
    except BaseException:
        print(procs.logs())
        raise
    finally:
        if running is not None and not running.done():
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
        with contextlib.suppress(Exception):
            await procs.close()


@pytest.fixture
async def two_servers() -> AsyncIterator[tuple[OwnPostgres, OwnPostgres]]:
    """Two unrelated servers, for a DSN's list of hosts; deleted afterwards."""
    servers = [OwnPostgres("first"), OwnPostgres("second")]
    try:
        await asyncio.gather(*(asyncio.to_thread(server.create) for server in servers))
        yield servers[0], servers[1]
    finally:
        for server in servers:
            await asyncio.to_thread(server.destroy)


async def task_count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'DONE'")
    finally:
        await conn.close()
    return count


async def test_a_primary_that_turns_read_only_sends_every_process_to_the_writable_host(
    two_servers: tuple[OwnPostgres, OwnPostgres], broker_settings: BrokerSettings
) -> None:
    """A server can stop accepting writes under open connections (demoted, or set
    ``default_transaction_read_only`` when its disk fills). The api answers 503 with
    Retry-After, never 500, and every process's connections, the relay's LISTEN
    included, move to the host of the list that accepts writes; no restart."""
    first, second = two_servers
    for server in (first, second):
        migrated = await run_command("db", ["migrate"], process_env(server.url, broker_settings))
        assert migrated.code == 0, migrated
    dsn = (
        f"postgresql://postgres@{first.host},{second.host}/taskbox?target_session_attrs=read-write"
    )
    procs = Cluster(process_env(dsn, broker_settings))
    try:
        _, base_url = await procs.api()
        relay = await procs.relay(RELAY_POLL_INTERVAL=str(RELAY_POLL))
        await procs.consumer()
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            for _ in range(5):
                reply = await client.post("/api/v1/tasks", json={"type": "echo", "payload": {}})
                assert reply.status_code == 201, reply.text
            await wait_until(lambda: task_count(first.url), lambda n: n == 5, "5 DONE on first", 20)

            conn = await asyncpg.connect(first.url)
            try:
                await conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                await conn.close()

            # Each pooled connection fails once (503) and is dropped; then 201s again.
            answers = Counter[int]()
            deadline = time.monotonic() + 10
            while answers[201] < 5 and time.monotonic() < deadline:
                reply = await client.post("/api/v1/tasks", json={"type": "echo", "payload": {}})
                answers[reply.status_code] += 1
                if reply.status_code == 503:
                    assert reply.headers.get("Retry-After"), reply.headers
                else:
                    assert reply.status_code == 201, reply.text
        print(f"read-only primary: answers {dict(answers)}")
        assert answers[201] == 5, f"the api never left the read-only host: {dict(answers)}"
        # Started and finished by a relay (its poll is long: woken by its LISTEN, which
        # must have moved too) and a consumer, on the writable host.
        await wait_until(
            lambda: task_count(second.url),
            lambda n: n == 5,
            "5 DONE on the writable host",
            RELAY_POLL / 2,
            context=procs.logs,
        )
        assert "LISTEN connection re-established" in relay.output, relay.output
    except BaseException:
        print(procs.logs())
        raise
    finally:
        with contextlib.suppress(Exception):
            await procs.close()
