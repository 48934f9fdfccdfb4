"""The Jepsen-style run: thousands of tasks over HTTP while faults hit at random moments.

An api (straight to Postgres), two relays and two consumers (to Postgres and RabbitMQ
through the tests' TCP proxies) run with short timings. A load generator creates tasks
at a steady rate (mostly echo, some sleeps, some failing until a later attempt, some
cancelled with DELETE) while a fault loop, driven by a seeded RNG, SIGKILLs relays and
consumers (a supervisor restarts them), cuts every AMQP and every Postgres connection
at the proxies, freezes one consumer's Postgres link (one way or both, sockets left
open) for longer than TASK_STALE_AFTER, terminates the relays' LISTEN backends and
stops and starts the RabbitMQ app once. Among the tasks are misbehaving handlers
(tests/integration/misbehaving.py): event-loop stalls longer than TASK_STALE_AFTER,
handlers that swallow their cancel (some cancelled while they run, so they are
abandoned after HANDLER_CANCEL_GRACE), a library-cancelled inner task, results and
errors Postgres cannot store, and handlers that end their consumer's process (the
supervisor restarts it). Then the faults stop, everything drains, and a checker compares what
the API acknowledged with what the database holds:

- lost: answered 201, but the task row or its outbox event is not there (must be 0);
- stuck: there, but not terminal at the drain deadline (must be 0);
- results committed twice: a task whose terminal outcome was written more than once,
  counted by an audit trigger on the test's own database copy (must be 0);
- stale writes: an outcome (terminal or not: a retry, a release too) written by a
  consumer whose lease was not the current one, from the same audit (must be 0; see
  cluster.STALE_WRITES);
- duplicate executions (allowed, reported): handler runs, recorded by the handlers
  themselves, whose outcome was never committed because a fault struck mid-handler or
  before the commit; the task then ran again (or failed as WorkerLost);
- stranded claims (reported): rescued attempts that a live consumer had claimed but
  never ran. A lost claim reply used to cause them; the consumer now runs a task it
  finds already claimed under its own worker id
  (test_crash_windows.py::test_a_claim_whose_reply_was_lost_still_runs_the_task). A
  pause of a consumer's Postgres link strands some by design: a claim whose reply is
  held past TASK_STALE_AFTER is rescued before its handler can start, and the run that
  follows finds the task no longer its own. Elsewhere, one would be a new way to strand
  a claim: look at the timeline;
- webhooks lost (must be 0): a terminal task whose event never reached the test's
  webhook receiver with a valid signature and a 2xx answer, although the receiver
  refuses some requests and leaves some unanswered past WEBHOOK_TIMEOUT and the
  relays, whose delivery workers send them, are killed and cut off like the rest;
- wrong outcomes (must be 0): a DONE task whose result is not what its handler returns,
  a FAILED task that failed for any reason but a lost worker or its own misbehaviour
  (UnserializableResult, HandlerCancelled, ...), a cancel answered 200 whose task did
  not end CANCELLED.

Each kind of fault must have happened at least once (counted from the proxies, the
consumers' exit codes and logs, the handlers' execution log and the task rows), or the
run proves nothing about it.

Reproduce a run with CHAOS_SEED=<seed>; CHAOS_TASKS and CHAOS_SECONDS size it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
import standardwebhooks

from taskbox.broker.settings import BrokerSettings
from taskbox.db import webhooks as webhook_store
from taskbox.db.schedules import ScheduleDefinition, create_schedule
from taskbox.db.settings import DatabaseSettings
from taskbox.runtime.queues import amqp_queue_name
from taskbox.webhooks import EVENTS, new_secret
from tests.conftest import AMQP_URL
from tests.faults import recorder
from tests.faults.cluster import (
    FAST_CONSUMER,
    STALE_WRITES,
    TERMINAL,
    TERMINAL_WRITTEN_TWICE,
    Cluster,
    rabbitmqctl_available,
    restart_broker,
    running,
    stop_cleanly,
    wait_until,
)
from tests.faults.proxy import TcpProxy
from tests.faults.side_queue import SIDE_QUEUE
from tests.integration.processes import ServiceProcess
from tests.integration.schedule_checks import count_ticks
from tests.integration.webhook_receiver import Answer, Received, Receiver

SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1_000_000))
TASK_COUNT = int(os.environ.get("CHAOS_TASKS", "3000"))
LOAD_SECONDS = float(os.environ.get("CHAOS_SECONDS", "60"))
DRAIN_DEADLINE = 60.0  # seconds after the last fault for every task to be terminal

# kill: SIGKILL of a relay or consumer, then a restart, as a supervisor would.
# pg_pause: one consumer's Postgres link stops carrying bytes (sockets stay open).
FAULTS = {
    "kill": 9,
    "amqp_cut": 3,
    "pg_cut": 3,
    "pg_pause": 3,
    "listen_kill": 4,
    "broker_restart": 1,
    "queue_pause": 2,
}
STALE_AFTER = float(FAST_CONSUMER["TASK_STALE_AFTER"])
CANCEL_GRACE = "1"  # HANDLER_CANCEL_GRACE of the chaos consumers
EXIT_CODE = 71  # what an "exit" task ends its consumer with: an expected death
MISBEHAVING = "tests.integration.misbehaving"
SIDE = "tests.faults.side_queue"  # the second queue's type, paused and resumed as a fault
KILL_VICTIMS = ["relay"] * 4 + ["consumer"] * 5

RELAY_APP = "taskbox-fault-relay"
# The relays' LISTEN connections: after connecting they ran LISTEN, later their
# self-check notifies itself. Pool connections of the relays never run either.
LISTENERS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name = $1
  AND (query LIKE 'LISTEN %' OR query = 'SELECT pg_notify($1, $2)')
"""


# -- the load -------------------------------------------------------------------------


@dataclass
class Planned:
    body: dict[str, Any]
    cancel_after: float | None  # seconds after the 201 to DELETE it, if at all
    cancel_running: bool = False  # DELETE it once it is PROCESSING


def misbehaving(rng: random.Random) -> list[Planned]:
    """The handlers that break the rules (tests/integration/misbehaving.py), a fixed
    number of each, so that every kind surely happens."""
    plan = [
        # The event loop blocked past TASK_STALE_AFTER on the first attempt only.
        Planned(
            {
                "type": "stall",
                "payload": {"seconds": round(rng.uniform(STALE_AFTER + 0.5, STALE_AFTER + 1.5), 2)},
                "max_attempts": 5,
            },
            None,
        )
        for _ in range(4)
    ]
    # Swallows its cancel: cancelled while it runs, it is abandoned after the grace.
    plan += [
        Planned({"type": "stubborn", "payload": {"seconds": 4.0}}, None, cancel_running=True)
        for _ in range(6)
    ]
    plan += [Planned({"type": "stubborn", "payload": {"seconds": 0.2}}, None) for _ in range(6)]
    plan += [
        Planned({"type": kind, "payload": {}, "max_attempts": 2}, None)
        for kind in ("inner-cancelled", "unstorable-result", "unstorable-error")
        for _ in range(6)
    ]
    # Ends its consumer's process on the first attempt.
    plan += [
        Planned(
            {"type": "exit", "payload": {"code": EXIT_CODE, "attempts": 1}, "max_attempts": 5},
            None,
        )
        for _ in range(3)
    ]
    return plan


@dataclass
class Acknowledged:
    id: uuid.UUID
    body: dict[str, Any]
    cancel_answer: int | None = None  # the DELETE's status code, if it was cancelled
    seen_running: bool = False  # a cancel_running task was PROCESSING before its DELETE


UNANSWERED = 0  # a DELETE that got no answer: it may or may not have taken effect


def plan_load(rng: random.Random, count: int) -> list[Planned]:
    """Mostly echo, some short sleeps, some failing until a later attempt; a few long
    sleeps cancelled while they run; a few of everything cancelled early."""
    plan = []
    for n in range(count):
        roll = rng.random()
        cancel_after: float | None = None
        if roll < 0.10:
            payload = {"message": "chaos drill", "succeed_on_attempt": rng.choice((2, 3))}
            body: dict[str, Any] = {"type": "fail", "payload": payload, "max_attempts": 5}
        elif roll < 0.22:
            body = {"type": "sleep", "payload": {"seconds": round(rng.uniform(0.05, 0.3), 3)}}
        elif roll < 0.24:
            body = {"type": "sleep", "payload": {"seconds": 1.5}}
            cancel_after = rng.uniform(0.3, 1.2)
        elif roll < 0.39:
            body = {"type": "side-echo", "payload": {"n": n, "tag": f"{rng.getrandbits(32):08x}"}}
        else:
            body = {"type": "echo", "payload": {"n": n, "tag": f"{rng.getrandbits(32):08x}"}}
        if cancel_after is None and rng.random() < 0.03:
            cancel_after = rng.uniform(0.0, 0.5)
        plan.append(Planned(body, cancel_after))
    # The misbehaving ones take the place of ordinary tasks while the faults go on,
    # early enough to end (and be retried) before the drain.
    odd = misbehaving(rng)
    for planned, n in zip(
        odd, rng.sample(range(count // 10, count * 8 // 10), len(odd)), strict=True
    ):
        plan[n] = planned
    return plan


class Load:
    """Creates the planned tasks at a steady rate; remembers every 201."""

    def __init__(self, client: httpx.AsyncClient, plan: list[Planned]) -> None:
        self._client = client
        self._plan = plan
        self.acknowledged: list[Acknowledged] = []
        # a POST not answered 201, a DELETE unanswered or answered other than 200/202/409
        self.api_errors: Counter[str] = Counter()

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        interval = seconds / len(self._plan)
        slots = asyncio.Semaphore(64)
        requests = []
        for n, planned in enumerate(self._plan):
            delay = start + n * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            requests.append(asyncio.create_task(self._create(planned, slots)))
        await asyncio.gather(*requests)

    async def _create(self, planned: Planned, slots: asyncio.Semaphore) -> None:
        async with slots:
            try:
                response = await self._client.post("/api/v1/tasks", json=planned.body)
            except httpx.HTTPError as exc:
                self.api_errors[f"POST {type(exc).__name__}"] += 1
                return
        if response.status_code != 201:
            self.api_errors[f"POST {response.status_code}"] += 1
            return
        task = Acknowledged(uuid.UUID(response.json()["id"]), planned.body)
        self.acknowledged.append(task)
        if planned.cancel_running:
            await self._until_running(task)
        if planned.cancel_after is not None or planned.cancel_running:
            await asyncio.sleep(planned.cancel_after or 0.0)
            try:
                cancelled = await self._client.delete(f"/api/v1/tasks/{task.id}")
            except httpx.HTTPError as exc:
                self.api_errors[f"DELETE {type(exc).__name__}"] += 1
                task.cancel_answer = UNANSWERED
                return
            task.cancel_answer = cancelled.status_code
            if cancelled.status_code not in (200, 202, 409):  # cancelled, requested, finished
                self.api_errors[f"DELETE {cancelled.status_code}"] += 1

    async def _until_running(self, task: Acknowledged) -> None:
        """Poll (a while) until the task is PROCESSING; cancel it anyway after that."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                response = await self._client.get(f"/api/v1/tasks/{task.id}")
            except httpx.HTTPError:
                pass
            else:
                if (
                    response.status_code == 200
                    and response.json()["status"] != "NEW"
                    and (response.json()["status"] != "PENDING")
                ):
                    task.seen_running = response.json()["status"] == "PROCESSING"
                    return
            await asyncio.sleep(0.1)


# -- the faults -----------------------------------------------------------------------


@dataclass
class Faults:
    """Injects faults and keeps relays and consumers running, as a supervisor would."""

    rng: random.Random
    cluster: Cluster
    pool: asyncpg.Pool
    pg_proxy: TcpProxy
    amqp_proxy: TcpProxy
    workers: dict[str, list[ServiceProcess]]
    consumer_pg: list[TcpProxy]  # consumer i's own link to Postgres
    consumer_url: Callable[[int], str]  # consumer i's DATABASE_URL, a new name each call
    api: httpx.AsyncClient  # pauses and resumes the side queue
    counts: Counter[str] = field(default_factory=Counter)
    timeline: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    killed: set[int] = field(default_factory=set)  # pids SIGKILLed or ended by a handler
    started: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one restart at a time
    thaws: list[asyncio.Task[None]] = field(default_factory=list)
    resumes: list[asyncio.Task[None]] = field(default_factory=list)
    pause_errors: list[str] = field(default_factory=list)

    def note(self, event: str) -> None:
        self.timeline.append(f"{time.monotonic() - self.started:6.1f}s {event}")

    async def keep_running(self) -> None:
        async with self.lock:
            await self._keep_running()

    async def _keep_running(self) -> None:
        """Restart a relay or consumer that exited on its own; an exit no "exit" task
        asked for is remembered as unexpected."""
        for role, procs in self.workers.items():
            for i, proc in enumerate(procs):
                if not running(proc):
                    assert proc.proc is not None
                    code = proc.proc.returncode
                    if role == "consumer" and code == EXIT_CODE:
                        self.counts["exit"] += 1
                        self.killed.add(proc.proc.pid)
                    else:
                        self.unexpected_exits.append(
                            f"{role} pid {proc.proc.pid} exited {code}:\n"
                            + "\n".join(proc.lines[-30:])
                        )
                    self.note(f"{role} pid {proc.proc.pid} exited {code} by itself; restarting")
                    await self._restart(role, i)

    async def _restart(self, role: str, i: int) -> None:
        """A supervisor's restart of ``self.workers[role][i]``. A consumer gets a new
        application_name (the audit tells its writes from its predecessor's) and waits
        for its Postgres link to carry bytes again, or it could not even start."""
        proc = self.workers[role][i]
        if role != "consumer":
            self.workers[role][i] = await self.cluster.restart(proc)
            return
        proxy = self.consumer_pg[i]

        async def frozen() -> bool:
            return proxy.frozen

        await wait_until(frozen, lambda f: not f, "the paused link to thaw", within=30)
        env = {**proc.env, "DATABASE_URL": self.consumer_url(i)}
        self.workers[role][i] = await self.cluster.start(proc.module, **env)

    async def supervise(self, stop: asyncio.Event) -> None:
        """Notice dead processes quickly (an "exit" task ends one at any moment)."""
        while not stop.is_set():
            await self.keep_running()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await stop.wait()

    async def run(self, seconds: float) -> None:
        kinds = [kind for kind, n in FAULTS.items() for _ in range(n)]
        self.rng.shuffle(kinds)
        victims = list(KILL_VICTIMS)
        self.rng.shuffle(victims)
        moments = sorted(self.rng.uniform(2.0, seconds - 2.0) for _ in kinds)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for moment, kind in zip(moments, kinds, strict=True):
            delay = start + moment - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            async with self.lock:
                await self._keep_running()
                await self.inject(kind, victims)
        await asyncio.gather(*self.thaws, *self.resumes)
        await self.keep_running()

    async def inject(self, kind: str, victims: list[str]) -> None:
        if kind == "kill":
            role = victims.pop()
            procs = self.workers[role]
            i = self.rng.randrange(len(procs))
            victim = procs[i]
            assert victim.proc is not None
            victim.kill()
            self.killed.add(victim.proc.pid)
            await victim.wait(timeout=10)
            self.note(f"SIGKILL {role} pid {victim.proc.pid}")
            await asyncio.sleep(self.rng.uniform(0.0, 1.0))  # the supervisor's restart delay
            await self._restart(role, i)
        elif kind == "amqp_cut":
            # Each relay and consumer has one AMQP connection: cut them all, once back.
            await self._connected(self.amqp_proxy, sum(map(len, self.workers.values())))
            self.note(f"AMQP cut: {self.amqp_proxy.cut()} connections")
        elif kind == "pg_cut":
            await self._connected(self.pg_proxy, 1)
            cut = sum(proxy.cut() for proxy in (self.pg_proxy, *self.consumer_pg))
            self.note(f"Postgres cut: {cut} connections")
        elif kind == "pg_pause":
            # A link still paused from the last time is not paused again: every pause
            # counted is one that happened.
            flowing = [i for i, proxy in enumerate(self.consumer_pg) if not proxy.frozen]
            if not flowing:
                pending = [thaw for thaw in self.thaws if not thaw.done()]
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                flowing = [i for i, proxy in enumerate(self.consumer_pg) if not proxy.frozen]
            i = self.rng.choice(flowing)
            proxy = self.consumer_pg[i]
            await self._connected(proxy, 1)
            direction = self.rng.choice(("up", "down", "both"))
            seconds = self.rng.uniform(STALE_AFTER + 1.0, STALE_AFTER + 3.0)
            live = proxy.freeze(direction)
            self.note(f"Postgres link of consumer {i} paused {direction} for {seconds:.1f}s")
            if live == 0:
                self.note("  (no connection was open: nothing held)")
                self.counts["pg_pause_idle"] += 1
            self.thaws.append(asyncio.create_task(self._thaw_after(proxy, i, seconds)))
        elif kind == "listen_kill":
            pids = await self._listeners()
            if not pids:
                self.note("no relay LISTEN backend found to terminate")
                return
            for pid in pids:
                await self.pool.execute("SELECT pg_terminate_backend($1)", pid)
            self.note(f"pg_terminate_backend of LISTEN backends {pids}")
        elif kind == "queue_pause":
            if any(not resume.done() for resume in self.resumes):
                await asyncio.gather(*self.resumes)  # one pause at a time
            seconds = self.rng.uniform(2.0, 5.0)
            if not await self._queue_action("pause", f"chaos pause for {seconds:.1f}s"):
                return
            self.note(f"queue {SIDE_QUEUE} paused for {seconds:.1f}s")
            self.resumes.append(asyncio.create_task(self._resume_after(seconds)))
        elif kind == "broker_restart":
            if not rabbitmqctl_available():
                self.note("broker restart skipped: rabbitmqctl is not installed here")
                print("chaos: broker restart skipped: rabbitmqctl is not available")
                return
            down_for = self.rng.uniform(1.0, 3.0)
            self.note(f"rabbitmqctl stop_app for {down_for:.1f}s")
            await restart_broker(AMQP_URL, down_for)
            self.note("rabbitmqctl start_app: the broker accepts connections again")
        self.counts[kind] += 1

    async def _queue_action(self, action: str, reason: str) -> bool:
        """POST a pause or resume of the side queue; the api talks to Postgres directly,
        so only a Postgres cut can make it fail: it is tried again a while."""
        for _ in range(50):
            try:
                response = await self.api.post(
                    f"/api/v1/queues/{SIDE_QUEUE}/{action}", json={"reason": reason}
                )
            except httpx.HTTPError as exc:
                answer = type(exc).__name__
            else:
                if response.status_code == 200:
                    return True
                answer = f"{response.status_code} {response.text[:200]}"
            self.note(f"{action} of {SIDE_QUEUE} answered {answer}; again")
            await asyncio.sleep(0.2)
        self.pause_errors.append(f"{action} of {SIDE_QUEUE} never succeeded: {answer}")
        return False

    async def _resume_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if await self._queue_action("resume", "chaos resume"):
            self.note(f"queue {SIDE_QUEUE} resumed")

    async def _thaw_after(self, proxy: TcpProxy, i: int, seconds: float) -> None:
        await asyncio.sleep(seconds)  # the length of the pause itself
        proxy.thaw()
        self.note(f"Postgres link of consumer {i} flows again")

    async def _connected(self, proxy: TcpProxy, count: int) -> None:
        """Wait (a while) for ``count`` connections: a cut should cut something."""

        async def live() -> int:
            return proxy.live

        try:
            await wait_until(live, lambda n: n >= count, "connections", within=15)
        except AssertionError:
            self.note(f"only {proxy.live} of {count} connections are back; cutting anyway")

    async def _listeners(self) -> list[int]:
        """The relays' LISTEN backends; after a cut they may still be reconnecting."""
        deadline = time.monotonic() + 10
        while True:
            pids = [row["pid"] for row in await self.pool.fetch(LISTENERS, RELAY_APP)]
            if pids or time.monotonic() > deadline:
                return pids
            await asyncio.sleep(0.1)


# -- the checker ----------------------------------------------------------------------

_TASKS = """
SELECT t.id, t.type, t.payload, t.status, t.attempts, t.max_attempts, t.result, t.error,
       t.cancel_requested, t.heartbeat_at, t.worker_id,
       EXISTS (SELECT 1 FROM outbox AS o WHERE o.task_id = t.id AND o.kind = 'task.created')
           AS has_event
FROM tasks AS t WHERE t.id = ANY($1::uuid[])
"""


# How each misbehaving type may fail besides WorkerLost (every attempt lost to faults):
# its error type, and whether that takes every attempt (an ordinary failure is retried).
OWN_FAILURE = {
    "inner-cancelled": ("HandlerCancelled", True),
    "unstorable-result": ("UnserializableResult", False),  # a PermanentError: at once
    "unstorable-error": ("RuntimeError", True),
}


def wrong_outcome(task: Acknowledged, row: asyncpg.Record) -> str | None:
    """Why this terminal row is not an outcome the task could legitimately have."""
    status, kind, payload = row["status"], row["type"], row["payload"]
    error = row["error"] or {}
    if status == "DONE":
        expected: Any = {
            "echo": payload,
            "side-echo": payload,
            "sleep": {"slept": payload.get("seconds")},
            "fail": {"succeeded_on_attempt": row["attempts"]},
            "stall": {"attempt": row["attempts"]},
            "exit": {"attempt": row["attempts"]},
        }.get(kind)
        if kind == "stubborn":
            # Every cancel it met (a stop, a lost task) is swallowed and counted.
            swallowed = (row["result"] or {}).get("swallowed")
            if not isinstance(swallowed, int) or swallowed < 0 or len(row["result"]) != 1:
                return f"DONE with result {row['result']!r}, expected a swallowed count"
        elif row["result"] != expected:
            return f"DONE with result {row['result']!r}, expected {expected!r}"
        if kind == "fail" and row["attempts"] < payload["succeed_on_attempt"]:
            return "DONE before the attempt it was told to succeed on"
        if kind == "exit" and row["attempts"] <= payload["attempts"]:
            return "DONE on an attempt that should have ended its process"
        if kind in OWN_FAILURE:
            return "DONE, but its handler can never succeed"
    elif status == "FAILED":
        own, every_attempt = OWN_FAILURE.get(kind, ("WorkerLost", False))
        if error.get("type") == "WorkerLost":
            pass  # every attempt was lost to a fault
        elif error.get("type") != own:
            return f"FAILED with {row['error']!r}"
        elif every_attempt and row["attempts"] != row["max_attempts"]:
            return f"FAILED with {own} after {row['attempts']} of {row['max_attempts']} attempts"
        elif kind == "unstorable-result" and "NUL" not in error.get("message", ""):
            return f"FAILED without saying what could not be stored: {row['error']!r}"
        elif kind == "unstorable-error" and "\ufffd" not in error.get("message", ""):
            return f"FAILED without the unstorable text replaced: {row['error']!r}"
    if status != "DONE" and kind == "stall":
        return f"a stall ended {status} {row['error']!r}: it is only slow, and retried"
    elif status == "CANCELLED" and task.cancel_answer not in (200, 202, UNANSWERED):
        return "CANCELLED, but nobody cancelled it"
    if task.cancel_answer == 200 and status != "CANCELLED":
        return f"DELETE answered 200, yet the task ended {status}"
    return None


def misbehaviour_seen(
    tasks: list[Acknowledged],
    rows: dict[uuid.UUID, asyncpg.Record],
    runs: Counter[tuple[str, int]],
) -> Counter[str]:
    """How often each misbehaviour actually happened: a stall or an exit is a handler
    run (in the execution log) of an attempt told to misbehave; the others are the
    outcomes they end in."""
    seen: Counter[str] = Counter()
    for task in tasks:
        row = rows.get(task.id)
        if row is None:
            continue
        kind, error = row["type"], (row["error"] or {}).get("type")
        if kind in ("stall", "exit"):
            seen[f"{kind}_runs"] += sum(
                runs[(str(task.id), attempt)]
                for attempt in range(1, row["payload"]["attempts"] + 1)
            )
        elif kind == "stubborn" and task.seen_running and row["status"] == "CANCELLED":
            seen["stubborn_cancelled_running"] += 1
        elif kind in OWN_FAILURE and error == OWN_FAILURE[kind][0]:
            seen[error] += 1
    return seen


@dataclass
class Verdict:
    created: int
    terminal: int
    lost: list[str]
    stuck: list[str]
    wrong: list[str]
    results_committed_twice: list[str]
    stale_writes: list[str]
    seen: Counter[str]  # how often each misbehaviour happened, by the rows and the log
    runs: int
    duplicate_executions: int
    rescued: int
    stranded_claims: list[str]
    statuses: Counter[str]

    def line(self, faults: Counter[str], extra: str) -> str:
        fault_text = ",".join(f"{kind}:{faults[kind]}" for kind in FAULTS)
        status_text = "/".join(f"{s}:{self.statuses[s]}" for s in TERMINAL)
        return (
            f"chaos: created={self.created} terminal={self.terminal} lost={len(self.lost)}"
            f" stuck={len(self.stuck)} duplicate_executions={self.duplicate_executions}"
            f" results_committed_twice={len(self.results_committed_twice)}"
            f" stale_writes={len(self.stale_writes)}"
            f" faults={fault_text} seed={SEED}"
            f" wrong_outcomes={len(self.wrong)} handler_runs={self.runs}"
            f" rescued={self.rescued} stranded_claims={len(self.stranded_claims)}"
            f" outcomes={status_text} {extra}"
        )


# Each rescued attempt, and the consumer that had claimed it.
_RESCUED_CLAIMS = """
SELECT r.task_id, r.old_attempts AS attempt, c.worker_id
FROM fault_audit AS r
JOIN fault_audit AS c
  ON c.task_id = r.task_id AND c.source = 'claim' AND c.new_attempts = r.old_attempts
WHERE r.source = 'rescue'
"""


async def check(
    pool: asyncpg.Pool, tasks: list[Acknowledged], executions: Path, killed: set[int]
) -> Verdict:
    rows = {row["id"]: row for row in await pool.fetch(_TASKS, [t.id for t in tasks])}
    lost, stuck, wrong = [], [], []
    statuses: Counter[str] = Counter()
    for task in tasks:
        row = rows.get(task.id)
        if row is None or not row["has_event"]:
            lost.append(f"{task.id} {task.body} row={dict(row) if row else None}")
            continue
        statuses[row["status"]] += 1
        if row["status"] not in TERMINAL:
            stuck.append(f"{task.id} {dict(row)}")
            continue
        why = wrong_outcome(task, row)
        if why is not None:
            wrong.append(f"{task.id} {why}: {dict(row)} cancel={task.cancel_answer}")

    twice = [
        f"{row['task_id']} {row['writes']}" for row in await pool.fetch(TERMINAL_WRITTEN_TWICE)
    ]
    stale = [
        f"{row['task_id']} lease {row['lease']}: {row['why']}"
        for row in await pool.fetch(STALE_WRITES)
    ]
    # An execution counts once its attempt's outcome was committed (the finish statement
    # moved the task out of PROCESSING at that attempt); every other run was lost to a
    # fault, and the handler ran again for it.
    committed = Counter(
        (str(row["task_id"]), row["old_attempts"])
        for row in await pool.fetch(
            "SELECT task_id, old_attempts FROM fault_audit"
            " WHERE source = 'finish' AND old_status = 'PROCESSING'"
        )
    )
    runs = Counter((task_id, attempt) for task_id, attempt, _ in recorder.read(str(executions)))
    seen = misbehaviour_seen(tasks, rows, runs)
    duplicates = sum(max(0, n - committed[key]) for key, n in runs.items())
    rescued = await pool.fetchval("SELECT count(*) FROM fault_audit WHERE source = 'rescue'")
    # A rescued attempt whose handler never started although its consumer was never
    # killed: a claim committed that its consumer did not act on.
    stranded = [
        f"{row['task_id']} attempt {row['attempt']} claimed by {row['worker_id']}"
        for row in await pool.fetch(_RESCUED_CLAIMS)
        if (str(row["task_id"]), row["attempt"]) not in runs
        and int(row["worker_id"].split(":")[-2]) not in killed
    ]
    return Verdict(
        created=len(tasks),
        terminal=sum(statuses[s] for s in TERMINAL),
        lost=lost,
        stuck=stuck,
        wrong=wrong,
        results_committed_twice=twice,
        stale_writes=stale,
        seen=seen,
        runs=sum(runs.values()),
        duplicate_executions=duplicates,
        rescued=int(rescued),
        stranded_claims=stranded,
        statuses=statuses,
    )


async def wait_terminal(pool: asyncpg.Pool, faults: Faults, within: float) -> float:
    """Poll until no task is left unfinished or ``within`` passed; returns the time taken."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        await faults.keep_running()
        left = await pool.fetchval(
            "SELECT count(*) FROM tasks WHERE status <> ALL($1::text[])", list(TERMINAL)
        )
        if left == 0:
            break
        await asyncio.sleep(0.5)
    return time.monotonic() - started


# -- webhooks (issue 18) --------------------------------------------------------------
#
# One subscription to every outcome, at a receiver in this process that answers some
# requests 500 and leaves some unanswered past WEBHOOK_TIMEOUT, while the relays (whose
# delivery workers send them) are killed and cut off from Postgres with the rest. At the
# end every terminal task's event must have been accepted (answered 2xx) at least once
# with a signature the Standard Webhooks library verifies: webhooks_lost=0.
WEBHOOK_RELAY = {
    "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    "WEBHOOK_TIMEOUT": "1",
    "WEBHOOK_RETRY_BASE_DELAY": "0.2",
    "WEBHOOK_RETRY_MAX_DELAY": "2",
    "WEBHOOK_MAX_ATTEMPTS": "100",  # a delivery never runs out within the run
    "WEBHOOK_POLL_INTERVAL": "0.2",
}
WEBHOOK_DRAIN_DEADLINE = 60.0
EVENT_OF = dict(zip(TERMINAL, ("task.done", "task.failed", "task.cancelled"), strict=True))


class WebhookSink:
    """The receiver's plan: verifies each request on arrival (the library refuses a
    timestamp older than five minutes), then answers 200, 500, or too late."""

    def __init__(self, rng: random.Random, secret: str) -> None:
        self._rng = rng
        self._webhook = standardwebhooks.Webhook(secret)
        self.accepted: set[tuple[str, str]] = set()  # (task id, event) answered 200
        self.invalid = 0
        self.refused = 0
        self.hung = 0

    def __call__(self, _count: int, request: Received) -> Answer:
        try:
            event = self._webhook.verify(request.body, request.headers)
        except standardwebhooks.WebhookVerificationError:
            self.invalid += 1
            return Answer(400, b"bad signature")
        roll = self._rng.random()
        if roll < 0.15:
            self.refused += 1
            return Answer(500, b"try again")
        if roll < 0.2:
            self.hung += 1
            return Answer(200, delay=2.5)  # past WEBHOOK_TIMEOUT: not an acceptance
        self.accepted.add((event["data"]["id"], event["type"]))
        return Answer(200)

    def lost(self, terminal: list[asyncpg.Record]) -> list[str]:
        """Terminal tasks whose event was never accepted."""
        return [
            f"{row['id']} {row['status']}"
            for row in terminal
            if (str(row["id"]), EVENT_OF[row["status"]]) not in self.accepted
        ]


async def wait_webhooks(pool: asyncpg.Pool, faults: Faults, within: float) -> float:
    """Poll until every delivery is settled or ``within`` passed; the time taken."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        await faults.keep_running()
        left = await pool.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE status <> 'delivered'"
        )
        if left == 0:
            break
        await asyncio.sleep(0.5)
    return time.monotonic() - started


# -- the run --------------------------------------------------------------------------


# A 1-second schedule ticks through the whole run (issue 17): catch_up=all, so every tick
# from its first to its last must have exactly one task, whatever the relays (each a
# scheduler candidate) went through. Paused when the faults stop, so the run drains.
TICK_SCHEDULE = "chaos-tick"
TICK_STEP = timedelta(seconds=1)

ABANDONED = "abandoning a handler that ignored its"
OWNERSHIP_LOST = "stopping an attempt whose task is no longer ours"
FENCED = "not recorded: the task changed owner meanwhile"  # a stale writer turned away
PARKED = re.compile(r"parked (\d+) rows of paused queues")


def fault_summary(faults: Faults, verdict: Verdict, cluster: Cluster) -> Counter[str]:
    """Each fault and misbehaviour, and how often it happened in this run."""
    logs = [line for proc in cluster.procs if proc.module == "consumer" for line in proc.lines]
    return Counter(
        {
            **{kind: faults.counts[kind] for kind in FAULTS},
            "pg_pause_idle": faults.counts["pg_pause_idle"],
            "stall_runs": verdict.seen["stall_runs"],
            "exits": faults.counts["exit"],
            "exit_runs": verdict.seen["exit_runs"],
            "abandoned": sum(ABANDONED in line for line in logs),
            "stubborn_cancelled_running": verdict.seen["stubborn_cancelled_running"],
            "HandlerCancelled": verdict.seen["HandlerCancelled"],
            "UnserializableResult": verdict.seen["UnserializableResult"],
            "unstorable_error": verdict.seen["RuntimeError"],
            "ownership_lost": sum(OWNERSHIP_LOST in line for line in logs),
            "fenced_outcomes": sum(FENCED in line for line in logs),
            "rescued": verdict.rescued,
            # rows of the side queue the relays parked while it was paused
            "parked": sum(
                int(match.group(1))
                for proc in cluster.procs
                if proc.module == "relay"
                for line in proc.lines
                if (match := PARKED.search(line))
            ),
        }
    )


# Each must have happened at least once, or the run did not test it.
MUST_HAPPEN = (
    "pg_pause",
    "stall_runs",
    "exits",
    "abandoned",
    "stubborn_cancelled_running",
    "HandlerCancelled",
    "UnserializableResult",
    "unstorable_error",
    # A stale writer tried (a stall or a pause outlived TASK_STALE_AFTER) and was
    # turned away: stale_writes=0 was put to the test.
    "fenced_outcomes",
    # The side queue was paused under load: its tasks were held, then resumed.
    "queue_pause",
    "parked",
)


@pytest.mark.timeout(480)
@pytest.mark.usefixtures("broker_guard")
async def test_chaos_nothing_acknowledged_is_lost_and_no_result_is_committed_twice(
    audited: asyncpg.Pool,
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    pg_proxy: TcpProxy,
    amqp_proxy: TcpProxy,
    cluster: Cluster,
    tmp_path: Path,
    fault_report: Callable[[str], None],
) -> None:
    pool = audited
    print(f"chaos: seed={SEED} (CHAOS_SEED={SEED} repeats this run's load and faults)")
    executions = tmp_path / "executions.log"
    database = pg_proxy.url(db_settings.database_url)
    amqp = {"AMQP_URL": amqp_proxy.url(broker_settings.amqp_url)}
    relay_env = {
        **amqp,
        **WEBHOOK_RELAY,
        "DATABASE_URL": f"{database}?application_name={RELAY_APP}",
    }
    # Each consumer slot has a Postgres link of its own, to pause one alone, and each
    # consumer process an application_name of its own, for the audit.
    consumer_pg = [await TcpProxy.to_url(db_settings.database_url).start() for _ in range(2)]
    generations = iter(range(1_000_000))

    def consumer_url(i: int) -> str:
        url = consumer_pg[i].url(db_settings.database_url)
        return f"{url}?application_name=taskbox-fault-consumer-{i}-{next(generations)}"

    consumer_env = {
        **amqp,
        "TASK_MODULES": f"{MISBEHAVING},{SIDE},tests.faults.recorder",
        "CONSUMER_QUEUES": f"default,{SIDE_QUEUE}:20",
        "QUEUE_PAUSE_CHECK_INTERVAL": "0.3",
        "HANDLER_CANCEL_GRACE": CANCEL_GRACE,
        recorder.ENV: str(executions),
    }
    secret = new_secret()
    sink = WebhookSink(random.Random(SEED + 2), secret)
    receiver = await Receiver(sink).__aenter__()
    try:
        await webhook_store.create_webhook(
            pool, webhook_store.Subscription(f"{receiver.url}/chaos", EVENTS), secret
        )
        await create_schedule(
            pool,
            ScheduleDefinition(
                TICK_SCHEDULE, "echo", {"tick": True}, interval_seconds=1.0, catch_up="all"
            ),
            datetime.now(UTC),
        )
        _, base_url = await cluster.api(TASK_MODULES=f"{MISBEHAVING},{SIDE}")
        relays = await asyncio.gather(*(cluster.relay(**relay_env) for _ in range(2)))
        consumers = await asyncio.gather(
            *(cluster.consumer(**consumer_env, DATABASE_URL=consumer_url(i)) for i in range(2))
        )
        workers = {"relay": list(relays), "consumer": list(consumers)}
        client = httpx.AsyncClient(base_url=base_url, timeout=30)
        faults = Faults(
            random.Random(SEED + 1),
            cluster,
            pool,
            pg_proxy,
            amqp_proxy,
            workers,
            consumer_pg,
            consumer_url,
            client,
        )
        stop_supervising = asyncio.Event()
        supervisor = asyncio.create_task(faults.supervise(stop_supervising))
        async with client:
            load = Load(client, plan_load(random.Random(SEED), TASK_COUNT))
            loaded = time.monotonic()
            await asyncio.gather(load.run(LOAD_SECONDS), faults.run(LOAD_SECONDS))
            loaded = time.monotonic() - loaded
            faults.note("faults stopped; draining")
            await pool.execute("UPDATE schedules SET paused = true WHERE name = $1", TICK_SCHEDULE)
            drained = await wait_terminal(pool, faults, DRAIN_DEADLINE)
            hooks_drained = await wait_webhooks(pool, faults, WEBHOOK_DRAIN_DEADLINE)
        stop_supervising.set()
        await supervisor
        verdict = await check(pool, load.acknowledged, executions, faults.killed)
        async with pool.acquire() as conn:
            ticks = await count_ticks(conn, TICK_SCHEDULE, TICK_STEP)
        happened = fault_summary(faults, verdict, cluster)
        terminal = await pool.fetch(
            "SELECT id, status FROM tasks WHERE status = ANY($1::text[])", list(TERMINAL)
        )
        webhooks_lost = sink.lost(terminal)
        fault_report(
            verdict.line(
                faults.counts,
                f"load={loaded:.0f}s drain={drained:.1f}s"
                f" api_errors={sum(load.api_errors.values())}"
                f" unexpected_exits={len(faults.unexpected_exits)} {ticks}"
                f" webhooks_lost={len(webhooks_lost)} webhooks_accepted={len(sink.accepted)}"
                f" webhook_requests={len(receiver.requests)} webhooks_refused={sink.refused}"
                f" webhooks_hung={sink.hung} invalid_signatures={sink.invalid}"
                f" webhook_drain={hooks_drained:.1f}s",
            )
        )
        fault_report("chaos faults: " + " ".join(f"{kind}={n}" for kind, n in happened.items()))
        evidence = "\n".join(
            [
                "timeline:",
                *faults.timeline,
                "lost:",
                *verdict.lost[:10],
                "stuck:",
                *verdict.stuck[:10],
                "written twice:",
                *verdict.results_committed_twice[:10],
                "stale writes:",
                *verdict.stale_writes[:10],
                "wrong outcomes:",
                *verdict.wrong[:10],
                "stranded claims:",
                *verdict.stranded_claims[:10],
                "unexpected exits:",
                *faults.unexpected_exits[:3],
                "webhooks lost:",
                *webhooks_lost[:10],
            ]
        )
        print(evidence)
        assert (
            len(verdict.lost),
            len(verdict.stuck),
            len(verdict.results_committed_twice),
            len(verdict.stale_writes),
        ) == (0, 0, 0, 0), evidence
        assert verdict.wrong == [], evidence
        assert (len(webhooks_lost), sink.invalid) == (0, 0), evidence
        assert len(terminal) >= len(load.acknowledged) and sink.refused and sink.hung
        assert (ticks.missing, ticks.duplicated) == ([], []), f"{ticks}\n{evidence}"
        assert ticks.ticks >= 10, ticks
        assert load.api_errors == Counter(), (
            f"the API did not answer as it should: {load.api_errors}"
        )
        assert faults.unexpected_exits == [], evidence
        assert faults.pause_errors == [], evidence
        paused = await pool.fetchval("SELECT count(*) FROM queue_pauses")
        assert paused == 0, "the side queue was left paused"
        assert faults.counts["pg_pause"] == FAULTS["pg_pause"], evidence
        assert [kind for kind in MUST_HAPPEN if happened[kind] == 0] == [], (
            f"faults that never happened: {happened}\n{evidence}"
        )
        assert happened["exits"] <= happened["exit_runs"], happened
        # Everyone survived the faults and still stops cleanly.
        await stop_cleanly(*faults.workers["consumer"], *faults.workers["relay"])
    finally:
        await receiver.__aexit__(None, None, None)
        for proxy in consumer_pg:
            await proxy.close()
        await delete_queue(broker_settings, amqp_queue_name(broker_settings.queue_name, SIDE_QUEUE))


async def delete_queue(settings: BrokerSettings, name: str) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        await (await connection.channel()).queue_delete(name)
