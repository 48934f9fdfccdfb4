"""A stateful property test of the delivery protocol, against the real Postgres.

Hypothesis drives a model of the whole system through random interleavings: the api
(create, cancel), relays (publish, crash between publish and commit, a refused publish,
a publish racing a consumer's claim), a broker (a queue with unacked deliveries,
redelivery when a channel or a consumer dies, a message it gives up on and
dead-letters), three consumers, the consumers' dead-letter watch, the rescue, the
operator's replay and the retention sweep. Every database write is the real query
function of ``db/`` (nothing here re-implements SQL), and every consumer's decisions
come from the real ``consumer.lifecycle.Executions``, with outcomes shaped by the real
``consumer.attempt`` functions: the actors below only carry out what those answer
(settle a message, put one back in the inbox, commit an outcome). A bug in the queries
or in the consumer's decision logic shows up as a broken invariant.

How it runs: the state machine is synchronous. It owns an asyncio event loop in a
thread of its own with one asyncpg pool on it, and every database call is a coroutine
handed to that loop and waited for (``Loop.run``); pytest-asyncio's session loop is not
involved. The whole test uses one database (a copy of the migrated template, from the
``db_settings`` fixture) and empties ``tasks`` and ``outbox`` at the start of each
example.

The clock: Postgres' ``now()`` is real time and the test does not wait. "Time passes"
(``time_passes``) moves every stored timestamp (tasks' created/updated/started/
finished/heartbeat/run_at, outbox's available/created/published) back by the same
amount, which to every query is the same as the clock moving forward. Heartbeats go
stale (a consumer that did not heartbeat in between was paused or partitioned),
retries' backoffs and scheduled tasks fall due, retention ages rows. The steps are
multiples of 4, 45 and 200 seconds against a staleness of 30 s and backoffs of 10 and
100 s, so a run's own few hundred milliseconds of real time never decide an outcome.

Faults: a claim, an outcome commit or a heartbeat whose reply is lost (the statement
committed, the actor never learns the answer) and which the actor later retries with
the same arguments; a claim answered and then lost in a failover to an asynchronous
standby (the rows go back to what they were, and the lease it handed out can be handed
out again, to another consumer; the model loses only that claim, the step's last write,
and with it, in one rule, the relay's record of the message); a relay that publishes
and dies before its commit (a duplicate);
a consumer's channel that closes while its handlers run (the broker redelivers its
unacked messages; the consumer's own copies go stale and settling them does nothing);
a consumer that crashes (its messages are redelivered, its rows stay PROCESSING until
the rescue); a graceful shutdown (held and queued messages handed back, handlers
stopped and released); a handler that outlives its stop and is abandoned.

After every step the invariants read the database (DESIGN.md, "Protocol invariants"):

* ``at_most_one_owner``: a PROCESSING task is held, under its current lease and worker
  id (the fence), by at most one live execution; an execution of another worker under
  the same lease number exists only when that worker's claim was lost in a failover.
* ``terminal_is_never_overwritten``: DONE, FAILED and CANCELLED change only by an
  operator's replay; every other status change is one the step's actors may write,
  and the lease (the fence) only grows, by one per claim.
* ``outcome_written_only_by_owner``: each outcome the fence let in was sent under the
  task's lease and by the worker the row named at that moment (checked around every
  ``finish_tasks`` call, a lost reply's too).
* ``answered_cancel_is_honoured``: after ``cancel_task`` answered changed=True, the
  task is never claimed again (its lease stays) and never goes back to NEW or PENDING;
  a task that was not running ends CANCELLED.
* ``acks_have_proof``: a message is acked only when its outcome was committed or the
  claim showed the task terminal, owned or superseded; a message a consumer drops
  from its hands without settling it counts as acked (the old consumer acked such
  "duplicates").
* ``every_task_has_a_way_forward`` (no orphans): a NEW or PENDING task has an
  unpublished outbox row, or a message (in the queue or in a live consumer's hands)
  that can still claim it, or (PENDING) a dead letter of its newest row that the watch
  has yet to see; PROCESSING is always fine (the rescue takes stale ones).

At the end of each example ``teardown`` drains the system (every lost reply retried,
every handler ending, everything delivered and claimed, the clock moved past every
staleness and backoff, the rescue and the relay run) until nothing moves, checks the
invariants after each round, and asserts that every task reached DONE, FAILED or
CANCELLED.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from taskbox.broker import messages
from taskbox.consumer.attempt import ClaimedTask, failed_outcome, stopped_outcome
from taskbox.consumer.lifecycle import Execution, Executions, Phase, Settlement
from taskbox.db import outbox, replay, retention
from taskbox.db.execution import (
    Delivery,
    Outcome,
    claim_tasks,
    finish_tasks,
    heartbeat,
    requeue_dead_lettered,
    rescue_stale,
)
from taskbox.db.pool import create_pool
from taskbox.db.settings import DatabaseSettings
from taskbox.db.states import TERMINAL, TaskStatus
from taskbox.db.tasks import NewTask, cancel_task, create_task
from taskbox.tasktypes import PermanentError

T = TypeVar("T")
S = TaskStatus


def _iso(moment: Any) -> str | None:
    return None if moment is None else moment.isoformat()


CONSUMERS = 3
MAX_TASKS = 5
STALE_AFTER = 30.0  # seconds without a heartbeat before a task may be rescued or re-claimed
REFUSED_BACKOFF = 6.0  # a refused publish is retried this much later
DRAIN_ROUNDS = 40
CALL_TIMEOUT = 60.0

SETTINGS = settings(
    # About 15 s on the dev box; PROTOCOL_EXAMPLES=2000 for a longer hunt.
    max_examples=int(os.environ.get("PROTOCOL_EXAMPLES", "200")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

PICK = st.integers(0, 7)  # an index into whatever list a rule picks from, modulo its length
CONSUMER = st.integers(0, CONSUMERS - 1)
REPLY = st.sampled_from(["answered", "answered", "answered", "lost"])
# A failover to an asynchronous standby may undo a claim after its consumer got the
# answer (the claim waits for its flush, so a crash alone does not).
CLAIM_REPLY = st.sampled_from(["answered", "answered", "answered", "lost", "undone by a failover"])

_RESET = "DELETE FROM outbox; DELETE FROM tasks"
_TASKS = """
SELECT id, status, lease, attempts, max_attempts, cancel_requested, worker_id,
       coalesce(heartbeat_at < now() - make_interval(secs => $1), false) AS stale
FROM tasks
"""
_OUTBOX = """
SELECT id, task_id, published_at IS NULL AS unpublished, available_at <= now() AS due FROM outbox
"""
_FENCE = "SELECT id, status, lease, worker_id FROM tasks WHERE id = ANY($1::uuid[])"
# What a claim changes, read before it and written back when a failover undoes it.
_CLAIMED_COLUMNS = """
SELECT id, status, attempts, lease, worker_id, started_at, heartbeat_at, updated_at
FROM tasks WHERE id = ANY($1::uuid[])
"""
_UNDO_CLAIM = """
UPDATE tasks AS t
SET status = b.status, attempts = b.attempts, lease = b.lease, worker_id = b.worker_id,
    started_at = b.started_at, heartbeat_at = b.heartbeat_at, updated_at = b.updated_at
FROM jsonb_to_recordset($1::jsonb) AS b(id uuid, status text, attempts int, lease bigint,
     worker_id text, started_at timestamptz, heartbeat_at timestamptz,
     updated_at timestamptz)
WHERE t.id = b.id
"""
_TIME_PASSES = """
UPDATE tasks SET created_at = created_at - $1::float8 * interval '1 second',
                 updated_at = updated_at - $1::float8 * interval '1 second',
                 started_at = started_at - $1::float8 * interval '1 second',
                 finished_at = finished_at - $1::float8 * interval '1 second',
                 heartbeat_at = heartbeat_at - $1::float8 * interval '1 second',
                 run_at = run_at - $1::float8 * interval '1 second';
"""
_OUTBOX_TIME_PASSES = """
UPDATE outbox SET available_at = available_at - $1::float8 * interval '1 second',
                  created_at = created_at - $1::float8 * interval '1 second',
                  published_at = published_at - $1::float8 * interval '1 second'
"""
_WAITING_ON_LOCK = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1"


class Loop:
    """An event loop of the test's own, in a thread: the state machine calls in."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="protocol-db")
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result(timeout=CALL_TIMEOUT)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()


@dataclass(frozen=True, slots=True)
class Environment:
    loop: Loop
    pool: asyncpg.Pool


# -- the broker -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One published copy of an outbox row: a relay that publishes a row twice makes two."""

    serial: int
    body: bytes  # as the relay encodes it (broker.messages)
    task_id: uuid.UUID
    outbox_id: int


@dataclass(eq=False, slots=True)
class Envelope:
    """One delivery of a message to one consumer: what the consumer holds and settles."""

    tag: int
    message: Message
    consumer: int
    parsed: messages.TaskMessage


class Broker:
    """A queue: ready messages, deliveries not settled yet, dead letters (the operators'
    queue, and the watch queue the consumers' dead-letter watch reads)."""

    def __init__(self) -> None:
        self.ready: list[Message] = []
        self.unacked: dict[int, Envelope] = {}
        self.dead: list[Message] = []
        self.watch: list[Message] = []
        self._serials = itertools.count(1)
        self._tags = itertools.count(1)

    def publish(self, row: asyncpg.Record) -> Message:
        encoded = messages.encode(
            outbox_id=row["id"], kind=row["kind"], body=row["body"], headers=row["headers"]
        )
        message = Message(next(self._serials), encoded.body, row["task_id"], row["id"])
        self.ready.append(message)
        return message

    def copy(self, message: Message) -> None:
        """The same outbox row published once more (a relay's record of it was lost)."""
        self.ready.append(
            Message(next(self._serials), message.body, message.task_id, message.outbox_id)
        )

    def deliver(self, message: Message, consumer: int) -> Envelope:
        self.ready.remove(message)
        envelope = Envelope(next(self._tags), message, consumer, messages.parse(message.body))
        self.unacked[envelope.tag] = envelope
        return envelope

    def settle(self, envelope: Envelope, how: Settlement | str) -> bool:
        """False for a delivery of a channel that is gone: the broker requeued it then."""
        if self.unacked.pop(envelope.tag, None) is None:
            return False
        if how == "requeue":
            self.ready.append(envelope.message)
        elif how == "dead-letter":
            self.dead_letter(envelope.message)
        return True

    def dead_letter(self, message: Message) -> None:
        """The dead-letter exchange is a fanout: one copy for operators, one watched."""
        self.dead.append(message)
        self.watch.append(message)

    def of_consumer(self, consumer: int) -> list[Envelope]:
        return [e for e in self.unacked.values() if e.consumer == consumer]

    def channel_closed(self, consumer: int) -> int:
        """The consumer's channel (or its whole process) is gone: redeliver its messages."""
        returned = self.of_consumer(consumer)
        for envelope in returned:
            del self.unacked[envelope.tag]
            self.ready.append(envelope.message)
        return len(returned)

    def in_flight(self) -> list[Message]:
        return [*self.ready, *(e.message for e in self.unacked.values())]


# -- a consumer ---------------------------------------------------------------------------


@dataclass(eq=False)
class Consumer:
    """One consumer process: the real Executions plus what the worker keeps around it."""

    index: int
    incarnation: int
    executions: Executions[Envelope] = field(default_factory=Executions)
    claims: dict[Execution[Envelope], ClaimedTask] = field(default_factory=dict)
    inbox: list[Envelope] = field(default_factory=list)  # delivered, not yet through the claim
    completion: list[Execution[Envelope]] = field(default_factory=list)  # to commit
    detached: list[Execution[Envelope]] = field(default_factory=list)  # lost/abandoned, running
    lost_claim: list[Envelope] | None = None  # a claim whose reply was lost: to retry
    lost_commit: list[Execution[Envelope]] | None = None
    lost_heartbeat: list[tuple[uuid.UUID, int]] | None = None
    shutting_down: bool = False

    @property
    def worker_id(self) -> str:
        return f"consumer-{self.index}.{self.incarnation}"

    @property
    def can_claim(self) -> bool:
        return not self.shutting_down and self.lost_claim is None

    def running(self) -> list[Execution[Envelope]]:
        return [e for e in self.executions if e.phase in (Phase.RUNNING, Phase.STOPPING)]

    def holds(self) -> list[Envelope]:
        """Every delivery this consumer still has in hand, to settle or claim some day."""
        held = [*self.inbox, *(self.lost_claim or [])]
        for execution in self.executions:
            held.extend([execution.message, *execution.held])
        return held

    @property
    def idle(self) -> bool:
        return not (len(self.executions) or self.completion or self.lost_commit or self.inbox)


# -- what the invariants read ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    status: str
    lease: int
    attempts: int
    max_attempts: int
    cancel_requested: bool
    worker_id: str | None
    stale: bool


@dataclass(frozen=True, slots=True)
class Snapshot:
    tasks: dict[uuid.UUID, Row]
    unpublished: dict[uuid.UUID, list[int]]  # task -> its unpublished outbox rows
    due: dict[uuid.UUID, list[int]]  # task -> its unpublished rows that are due
    newest: dict[uuid.UUID, int]  # task -> its newest outbox row


@dataclass(frozen=True, slots=True)
class Settling:
    """A settlement a consumer made, and on what grounds."""

    worker_id: str
    envelope: Envelope
    how: str  # ack, requeue, dead-letter
    basis: str  # claim refused, no such task, committed, vanished, handed back
    status: str | None  # the claim's seen_status or the commit's recorded status


@dataclass(frozen=True, slots=True)
class Cancel:
    step: int
    status: str  # the task's status when the cancel was answered
    lease: int


@dataclass
class Effects:
    """What the current step's actors wrote, for the transition checks."""

    created: set[uuid.UUID] = field(default_factory=set)
    claims: Counter[uuid.UUID] = field(default_factory=Counter)
    claimed_by: list[tuple[uuid.UUID, int]] = field(default_factory=list)  # task, outbox row
    finished: dict[uuid.UUID, int] = field(default_factory=dict)  # task -> the outcome's lease
    rescued: set[uuid.UUID] = field(default_factory=set)
    replayed: set[uuid.UUID] = field(default_factory=set)
    cancelled: set[uuid.UUID] = field(default_factory=set)
    relayed: set[uuid.UUID] = field(default_factory=set)
    requeued: set[uuid.UUID] = field(default_factory=set)  # sent again by the watch
    swept: bool = False
    settled: list[Settling] = field(default_factory=list)
    fence: list[str] = field(default_factory=list)  # outcomes the fence should have refused


class ProtocolMachine(RuleBasedStateMachine):
    environment: ClassVar[Environment | None] = None
    examples: ClassVar[int] = 0
    total_steps: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__()
        assert self.environment is not None, "run by test_delivery_protocol"
        self.loop = self.environment.loop
        self.pool = self.environment.pool
        self.db(self.pool.execute(_RESET))
        self.broker = Broker()
        self.consumers = [Consumer(i, 0) for i in range(CONSUMERS)]
        self.tasks: list[uuid.UUID] = []
        self.history: dict[uuid.UUID, list[str]] = {}
        self.cancels: dict[uuid.UUID, Cancel] = {}
        # (worker id, task, lease) of claims a failover undid after they were answered
        self.undone_claims: set[tuple[str, uuid.UUID, int]] = set()
        self.steps = 0
        self.label = "start"
        self.effects = Effects()
        self.previous: Snapshot | None = None
        self._snapshot: tuple[int, Snapshot] | None = None
        self.broken = False
        ProtocolMachine.examples += 1

    # -- plumbing ---------------------------------------------------------------------

    def db(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coro)

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.previous = self.current()
        self.steps += 1
        ProtocolMachine.total_steps += 1
        self.label = label
        self.effects = Effects()
        try:
            yield
            for consumer in self.consumers:
                self._forgotten(consumer)
        except BaseException:
            self.broken = True
            raise
        finally:
            self._snapshot = None  # the invariants read the state this step left

    def where(self) -> str:
        return f"step {self.steps} ({self.label})"

    def fail(self, what: str) -> None:
        self.broken = True
        raise AssertionError(f"{self.where()}: {what}")

    def current(self) -> Snapshot:
        if self._snapshot is None or self._snapshot[0] != self.steps:
            snapshot = self.db(self._read())
            for task_id, row in snapshot.tasks.items():
                seen = self.history.setdefault(task_id, [])
                if not seen or seen[-1] != row.status:
                    seen.append(row.status)
            self._snapshot = (self.steps, snapshot)
        return self._snapshot[1]

    async def _read(self) -> Snapshot:
        async with self.pool.acquire() as conn:
            tasks = await conn.fetch(_TASKS, STALE_AFTER)
            rows = await conn.fetch(_OUTBOX)
        unpublished: dict[uuid.UUID, list[int]] = {}
        due: dict[uuid.UUID, list[int]] = {}
        newest: dict[uuid.UUID, int] = {}
        for row in rows:
            newest[row["task_id"]] = max(newest.get(row["task_id"], 0), row["id"])
            if row["unpublished"]:
                unpublished.setdefault(row["task_id"], []).append(row["id"])
                if row["due"]:
                    due.setdefault(row["task_id"], []).append(row["id"])
        return Snapshot(
            {
                row["id"]: Row(
                    row["status"],
                    row["lease"],
                    row["attempts"],
                    row["max_attempts"],
                    row["cancel_requested"],
                    row["worker_id"],
                    row["stale"],
                )
                for row in tasks
            },
            unpublished,
            due,
            newest,
        )

    def _consumer(self, c: int, wanted: Callable[[Consumer], bool] | None = None) -> Consumer:
        """Consumer ``c``, or the next one that fits ``wanted`` (the rule's precondition
        holds for at least one)."""
        for offset in range(CONSUMERS):
            consumer = self.consumers[(c + offset) % CONSUMERS]
            if wanted is None or wanted(consumer):
                return consumer
        raise AssertionError("the precondition promised a consumer")

    def _task(self, pick: int) -> uuid.UUID:
        return self.tasks[pick % len(self.tasks)]

    def _status(self, task_id: uuid.UUID) -> str | None:
        row = self.current().tasks.get(task_id)
        return None if row is None else row.status

    # -- the actors' calls into db/ (every write of the test goes through these) -------

    def _claim(self, consumer: Consumer, batch: Sequence[Envelope]) -> list[asyncpg.Record]:
        deliveries = [Delivery(e.parsed.task_id, e.parsed.outbox_id) for e in batch]
        rows = self.db(claim_tasks(self.pool, deliveries, consumer.worker_id, STALE_AFTER))
        self._count_claims(rows, batch)
        return rows

    def _count_claims(self, rows: Sequence[asyncpg.Record], batch: Sequence[Envelope]) -> None:
        by_task = {e.parsed.task_id: e.parsed.outbox_id for e in batch}
        for row in rows:
            if row["claimed"]:
                self.effects.claims[row["id"]] += 1
                self.effects.claimed_by.append((row["id"], by_task[row["id"]]))

    def _finish(
        self, consumer: Consumer, batch: Sequence[Execution[Envelope]]
    ) -> dict[uuid.UUID, str]:
        outcomes = [e.outcome for e in batch if e.outcome is not None]
        before = {
            row["id"]: (row["status"], row["lease"], row["worker_id"])
            for row in self.db(self.pool.fetch(_FENCE, [o.task_id for o in outcomes]))
        }
        recorded = self.db(finish_tasks(self.pool, outcomes, consumer.worker_id))
        for o in outcomes:
            if o.task_id not in recorded:
                continue
            self.effects.finished[o.task_id] = o.lease
            status, lease, worker = before.get(o.task_id, (None, None, None))
            if status != S.PROCESSING or lease != o.lease or worker != consumer.worker_id:
                self.effects.fence.append(
                    f"{consumer.worker_id} wrote {recorded[o.task_id]} for task {o.task_id} "
                    f"under lease {o.lease} while the task was {status} under lease {lease} "
                    f"of {worker}"
                )
        return recorded

    def _heartbeat(
        self, consumer: Consumer, leases: list[tuple[uuid.UUID, int]]
    ) -> dict[uuid.UUID, bool]:
        return self.db(heartbeat(self.pool, leases, consumer.worker_id))

    async def _relay_batch(self, limit: int, fate: str) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                claim = await outbox.claim_batch(conn, limit)
                ids = [row["id"] for row in claim.rows]
                if fate == "published":
                    await outbox.record_publish_outcome(conn, ids, [])
                elif fate == "refused":
                    refusals = [outbox.PublishRefusal(i, "NO_ROUTE", REFUSED_BACKOFF) for i in ids]
                    await outbox.record_publish_outcome(conn, [], refusals)
            except BaseException:
                await transaction.rollback()
                raise
            if fate == "crashed":  # published, then died before the commit
                await transaction.rollback()
            else:
                await transaction.commit()
            return claim.rows

    async def _time_passes(self, seconds: float) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_TIME_PASSES, seconds)
            await conn.execute(_OUTBOX_TIME_PASSES, seconds)

    async def _replay(self, task_id: uuid.UUID, force: bool) -> replay.ChunkResult:
        async with self.pool.acquire() as conn:
            return await replay.replay_chunk(conn, [task_id], {}, force=force)

    async def _sweep(self, older_than: float) -> None:
        async with self.pool.acquire() as conn:
            async for _ in retention.delete_published_outbox(conn, older_than, 100):
                pass
            async for _ in retention.delete_finished_tasks(conn, older_than, 100):
                pass

    # -- the consumer actor: carries out what Executions decides ----------------------------

    def _settle(
        self, consumer: Consumer, envelope: Envelope, how: str, basis: str, status: str | None
    ) -> None:
        self.broker.settle(envelope, how)
        self.effects.settled.append(Settling(consumer.worker_id, envelope, how, basis, status))

    def _take_batch(self, consumer: Consumer, size: int, start: int) -> list[Envelope]:
        """Up to ``size`` deliveries of distinct tasks from the inbox for one claim; a
        delivery of a task this consumer runs is held by its execution (receive())."""
        order = (
            consumer.inbox[start % len(consumer.inbox) :]
            + consumer.inbox[: start % len(consumer.inbox)]
        )
        batch: list[Envelope] = []
        for envelope in order:
            if len(batch) >= size:
                break
            if any(e.parsed.task_id == envelope.parsed.task_id for e in batch):
                continue  # one delivery of a task per claim: the other waits its turn
            consumer.inbox.remove(envelope)
            if not consumer.executions.receive(envelope.parsed.task_id, envelope):
                batch.append(envelope)
        return batch

    def _claimed(
        self, consumer: Consumer, batch: Sequence[Envelope], rows: Sequence[asyncpg.Record]
    ) -> None:
        by_id = {row["id"]: row for row in rows}
        for envelope in batch:
            row = by_id[envelope.parsed.task_id]
            if row["claimed"]:
                execution = consumer.executions.start(row["id"], row["lease"], envelope)
                consumer.claims[execution] = ClaimedTask(
                    row["id"],
                    row["type"],
                    row["payload"],
                    row["attempts"],
                    row["max_attempts"],
                    lease=row["lease"],
                    outbox_id=envelope.parsed.outbox_id,
                )
            elif row["seen_status"] is None:
                self._settle(consumer, envelope, "dead-letter", "no such task", None)
            else:
                self._settle(consumer, envelope, "ack", "claim refused", row["seen_status"])

    def _claim_again(self, consumer: Consumer, envelopes: Sequence[Envelope]) -> None:
        if consumer.shutting_down:  # it claims nothing any more: back to the queue
            for envelope in envelopes:
                self._settle(consumer, envelope, "requeue", "handed back", None)
        else:
            consumer.inbox.extend(envelopes)

    def _committed(
        self,
        consumer: Consumer,
        batch: Sequence[Execution[Envelope]],
        recorded: dict[uuid.UUID, str],
    ) -> None:
        for execution in batch:
            status = recorded.get(execution.task_id)
            settled = consumer.executions.committed(execution, status)
            consumer.claims.pop(execution, None)
            for envelope, how in settled.settle:
                self._settle(consumer, envelope, how, "committed", status)
            self._claim_again(consumer, settled.claim_again)

    def _heartbeat_answer(
        self,
        consumer: Consumer,
        leases: Sequence[tuple[uuid.UUID, int]],
        owned: dict[uuid.UUID, bool],
    ) -> None:
        for task_id, lease in leases:
            if task_id not in owned:
                lost = consumer.executions.lose(task_id, lease)
                if lost is not None:
                    consumer.detached.append(lost)
                    consumer.claims.pop(lost, None)
                    self._claim_again(consumer, Executions.claim_again_after_loss(lost))
            elif owned[task_id]:
                execution = consumer.executions.get(task_id)
                if execution is not None and execution.lease == lease:
                    consumer.executions.stop(execution, "cancel")

    def _beat(self, consumer: Consumer) -> None:
        leases = consumer.executions.leases()
        if leases:
            self._heartbeat_answer(consumer, leases, self._heartbeat(consumer, leases))

    def _forgotten(self, consumer: Consumer) -> None:
        """A delivery the consumer no longer has in hand but never settled: the old
        worker acked such a "duplicate", and so does the actor (without proof)."""
        held = {id(e) for e in consumer.holds()}
        for envelope in self.broker.of_consumer(consumer.index):
            if id(envelope) not in held:
                self._settle(consumer, envelope, "ack", "vanished", None)

    def _outcome(
        self, consumer: Consumer, execution: Execution[Envelope], end: str, backoff: float
    ) -> Outcome:
        claimed = consumer.claims.get(execution)
        if claimed is None:  # a detached execution: its claim was forgotten with it
            claimed = ClaimedTask(execution.task_id, "echo", {}, 1, 1, lease=execution.lease)
        if end == "stopped" and execution.stop_reason is not None:
            return stopped_outcome(claimed, execution.stop_reason)
        if end == "retry":
            return failed_outcome(claimed, RuntimeError("flaky"), lambda attempt: backoff)
        if end == "permanent":
            return failed_outcome(claimed, PermanentError("bad input"), lambda attempt: backoff)
        return Outcome(
            claimed.task_id, claimed.attempt, S.DONE, result={"ok": True}, lease=claimed.lease
        )

    def _end(self, consumer: Consumer, execution: Execution[Envelope], outcome: Outcome) -> None:
        if consumer.executions.finish(execution, outcome):
            consumer.completion.append(execution)

    def _commit(self, consumer: Consumer) -> None:
        batch, consumer.completion = consumer.completion, []
        self._committed(consumer, batch, self._finish(consumer, batch))

    def _restart(self, consumer: Consumer) -> None:
        self.consumers[consumer.index] = Consumer(consumer.index, consumer.incarnation + 1)

    # -- rules: the api ------------------------------------------------------------------

    @precondition(lambda self: len(self.tasks) < MAX_TASKS)
    @rule(max_attempts=st.sampled_from([1, 2, 3]), delay=st.sampled_from([None, None, 10.0]))
    def create(self, max_attempts: int, delay: float | None) -> None:
        with self.step("create"):
            task = NewTask("echo", {"n": len(self.tasks)}, 0, max_attempts, delay=delay)
            row = self.db(create_task(self.pool, task))
            self.tasks.append(row["id"])
            self.effects.created.add(row["id"])

    def _in_creation_order(self, wanted: Callable[[Row], bool]) -> list[uuid.UUID]:
        """The tasks whose row fits ``wanted``, in the order they were created: a pick
        must name the same task when Hypothesis replays the steps (ids are random)."""
        rows = self.current().tasks
        return [t for t in self.tasks if t in rows and wanted(rows[t])]

    def _unfinished(self) -> list[uuid.UUID]:
        return self._in_creation_order(lambda row: row.status not in TERMINAL)

    @precondition(lambda self: self._unfinished())
    @rule(pick=PICK)
    def cancel(self, pick: int) -> None:
        candidates = self._unfinished()
        task_id = candidates[pick % len(candidates)]
        before = self.current().tasks[task_id]
        with self.step(f"cancel a {before.status} task"):
            answer = self.db(cancel_task(self.pool, task_id))
            if answer.changed:
                self.effects.cancelled.add(task_id)
                self.cancels[task_id] = Cancel(self.steps, before.status, before.lease)

    # -- rules: the relay ----------------------------------------------------------------

    @precondition(lambda self: self.current().due)
    @rule(
        limit=st.sampled_from([1, 8]),
        fate=st.sampled_from(["published", "published", "crashed", "refused"]),
    )
    def relay(self, limit: int, fate: str) -> None:
        with self.step(f"relay: {fate}"):
            rows = self.db(self._relay_batch(limit, fate))
            if fate != "refused":
                for row in rows:
                    self.broker.publish(row)
            self.effects.relayed.update(row["task_id"] for row in rows)

    def _publish_one_to(
        self, conn: asyncpg.Connection, consumer: Consumer
    ) -> tuple[outbox.Claim, list[Envelope]]:
        """In the relay's open transaction: claim one due row, publish it and deliver it
        to ``consumer`` at once; the claim and the consumer's batch to claim with."""
        claim = self.db(outbox.claim_batch(conn, 1))
        if not claim.rows:
            return claim, []
        envelope = self.broker.deliver(self.broker.publish(claim.rows[0]), consumer.index)
        consumer.inbox.append(envelope)
        return claim, self._take_batch(consumer, 1, len(consumer.inbox) - 1)

    @precondition(lambda self: self.current().due and any(c.can_claim for c in self.consumers))
    @rule(c=CONSUMER, commit=st.booleans())
    def relay_races_a_claim(self, c: int, commit: bool) -> None:
        """The relay has published and not recorded the confirm yet when a consumer gets
        the message and claims: the relay holds no lock on the task, so the claim takes
        it NEW at once, and the relay's record then leaves it (commit) or the relay rolls
        back (the row is published again: a duplicate). (A claim, retry and record in
        that order: tests/integration/test_relay.py, the late-confirm test.)"""
        consumer = self._consumer(c, lambda x: x.can_claim)
        with self.step(f"relay races {consumer.worker_id}: {'commit' if commit else 'rollback'}"):
            conn = self.db(self._acquire())
            try:
                transaction = conn.transaction()
                self.db(transaction.start())
                claim, batch = self._publish_one_to(conn, consumer)
                future: concurrent.futures.Future[list[asyncpg.Record]] | None = None
                if claim.rows:
                    self.effects.relayed.add(claim.rows[0]["task_id"])
                if batch:
                    pid: list[int] = []
                    future = self.loop.submit(self._claim_on_own_connection(consumer, batch, pid))
                    self.db(self._until_waiting_or_done(future, pid))
                if commit:
                    self.db(outbox.record_publish_outcome(conn, [r["id"] for r in claim.rows], []))
                    self.db(transaction.commit())
                else:
                    self.db(transaction.rollback())
                if future is not None:
                    rows = future.result(timeout=CALL_TIMEOUT)
                    self._count_claims(rows, batch)
                    self._claimed(consumer, batch, rows)
            finally:
                self.db(self.pool.release(conn))

    @precondition(lambda self: self.current().due and any(c.can_claim for c in self.consumers))
    @rule(c=CONSUMER)
    def failover_loses_a_claim(self, c: int) -> None:
        """A relay publishes a row, a consumer gets the message and claims its task, and
        the primary dies before its asynchronous standby received either commit: the
        relay's record is gone (the row goes out again) and so is the claim, whose
        consumer got its answer and runs the task under a lease the next claim hands out
        again."""
        consumer = self._consumer(c, lambda x: x.can_claim)
        with self.step(f"a failover loses a claim of {consumer.worker_id}"):
            conn = self.db(self._acquire())
            try:
                transaction = conn.transaction()
                self.db(transaction.start())
                _, batch = self._publish_one_to(conn, consumer)
                self.db(transaction.rollback())  # the relay's commit, lost
            finally:
                self.db(self.pool.release(conn))
            if not batch:
                return
            undo = self.db(self.pool.fetch(_CLAIMED_COLUMNS, [batch[0].parsed.task_id]))
            rows = self._claim(consumer, batch)
            self._claimed(consumer, batch, rows)
            self._failover_undoes_claim(consumer, batch, rows, undo, republish=False)

    async def _acquire(self) -> asyncpg.Connection:
        return await self.pool.acquire()

    async def _claim_on_own_connection(
        self, consumer: Consumer, batch: Sequence[Envelope], pid: list[int]
    ) -> list[asyncpg.Record]:
        async with self.pool.acquire() as conn:
            pid.append(conn.get_server_pid())
            deliveries = [Delivery(e.parsed.task_id, e.parsed.outbox_id) for e in batch]
            return await claim_tasks(conn, deliveries, consumer.worker_id, STALE_AFTER)

    async def _until_waiting_or_done(
        self, future: concurrent.futures.Future[Any], pid: list[int]
    ) -> None:
        for _ in range(500):
            if future.done():
                return
            if pid and await self.pool.fetchval(_WAITING_ON_LOCK, pid[0]):
                return
            await asyncio.sleep(0.002)

    # -- rules: the broker -----------------------------------------------------------------

    @precondition(
        lambda self: self.broker.ready and any(not c.shutting_down for c in self.consumers)
    )
    @rule(c=CONSUMER, pick=PICK)
    def deliver(self, c: int, pick: int) -> None:
        consumer = self._consumer(c, lambda x: not x.shutting_down)
        with self.step(f"deliver to {consumer.worker_id}"):
            message = self.broker.ready[pick % len(self.broker.ready)]
            consumer.inbox.append(self.broker.deliver(message, consumer.index))

    @precondition(lambda self: self.broker.ready)
    @rule(pick=PICK)
    def broker_gives_up(self, pick: int) -> None:
        """A quorum queue's delivery limit (or a TTL policy) dead-letters a message."""
        with self.step("the broker dead-letters a message"):
            message = self.broker.ready.pop(pick % len(self.broker.ready))
            self.broker.dead_letter(message)

    @precondition(lambda self: self.broker.watch)
    @rule(pick=PICK)
    def dead_letter_watch(self, pick: int) -> None:
        with self.step("the dead-letter watch decides on a dead letter"):
            self._watch(self.broker.watch.pop(pick % len(self.broker.watch)))

    def _watch(self, message: Message) -> None:
        decision = self.db(
            requeue_dead_lettered(self.pool, Delivery(message.task_id, message.outbox_id))
        )
        if decision.outbox_id is not None:
            self.effects.requeued.add(message.task_id)

    @precondition(lambda self: any(self.broker.of_consumer(c.index) for c in self.consumers))
    @rule(c=CONSUMER)
    def channel_closes(self, c: int) -> None:
        """The consumer's channel dies (a network blip): the broker redelivers its unacked
        messages while the process and its handlers carry on."""
        consumer = self._consumer(c, lambda x: bool(self.broker.of_consumer(x.index)))
        with self.step(f"channel of {consumer.worker_id} closes"):
            self.broker.channel_closed(consumer.index)

    # -- rules: a consumer ------------------------------------------------------------------

    @precondition(lambda self: any(c.can_claim and c.inbox for c in self.consumers))
    @rule(c=CONSUMER, size=st.integers(1, 2), start=PICK, reply=CLAIM_REPLY)
    def claim(self, c: int, size: int, start: int, reply: str) -> None:
        consumer = self._consumer(c, lambda x: x.can_claim and bool(x.inbox))
        with self.step(f"{consumer.worker_id} claims, reply {reply}"):
            batch = self._take_batch(consumer, size, start)
            if not batch:
                return
            ids = [e.parsed.task_id for e in batch]
            undo = self.db(self.pool.fetch(_CLAIMED_COLUMNS, ids))
            rows = self._claim(consumer, batch)
            if reply == "lost":
                consumer.lost_claim = batch
                return
            self._claimed(consumer, batch, rows)
            if reply == "undone by a failover":
                self._failover_undoes_claim(consumer, batch, rows, undo)

    def _failover_undoes_claim(
        self,
        consumer: Consumer,
        batch: Sequence[Envelope],
        rows: Sequence[asyncpg.Record],
        undo: Sequence[asyncpg.Record],
        *,
        republish: bool = True,
    ) -> None:
        """The claim did not reach the standby that took over: its rows are as they were,
        while the consumer, which got the answer, runs the tasks under leases that the
        next claim of each task hands out again. The relay's record of the message went
        with it (``republish``), so the relay publishes the row once more: a second
        consumer can claim the task under the same lease."""
        taken = {row["id"]: row["lease"] for row in rows if row["claimed"]}
        document = [
            {
                "id": str(row["id"]),
                "status": row["status"],
                "attempts": row["attempts"],
                "lease": row["lease"],
                "worker_id": row["worker_id"],
                "started_at": _iso(row["started_at"]),
                "heartbeat_at": _iso(row["heartbeat_at"]),
                "updated_at": _iso(row["updated_at"]),
            }
            for row in undo
            if row["id"] in taken
        ]
        self.db(self.pool.execute(_UNDO_CLAIM, orjson.Fragment(orjson.dumps(document))))
        for task_id, lease in taken.items():
            self.effects.claims[task_id] -= 1
            self.undone_claims.add((consumer.worker_id, task_id, lease))
        for envelope in batch:
            if republish and envelope.parsed.task_id in taken:
                self.broker.copy(envelope.message)

    @precondition(lambda self: any(c.lost_claim is not None for c in self.consumers))
    @rule(c=CONSUMER)
    def claim_is_retried(self, c: int) -> None:
        consumer = self._consumer(c, lambda x: x.lost_claim is not None)
        with self.step(f"{consumer.worker_id} retries its claim"):
            batch = consumer.lost_claim or []
            consumer.lost_claim = None
            self._claimed(consumer, batch, self._claim(consumer, batch))

    @precondition(lambda self: any(c.running() or c.detached for c in self.consumers))
    @rule(
        c=CONSUMER,
        pick=PICK,
        end=st.sampled_from(["done", "done", "retry", "permanent", "stopped"]),
        backoff=st.sampled_from([0.0, 10.0, 100.0]),
    )
    def handler_ends(self, c: int, pick: int, end: str, backoff: float) -> None:
        consumer = self._consumer(c, lambda x: bool(x.running() or x.detached))
        candidates = [*consumer.running(), *consumer.detached]
        execution = candidates[pick % len(candidates)]
        with self.step(f"a handler of {consumer.worker_id} ends: {end}"):
            if execution in consumer.detached:  # its outcome comes too late: dropped
                consumer.detached.remove(execution)
            self._end(consumer, execution, self._outcome(consumer, execution, end, backoff))

    @precondition(
        lambda self: any(e.phase is Phase.STOPPING for c in self.consumers for e in c.executions)
    )
    @rule(c=CONSUMER, pick=PICK)
    def grace_runs_out(self, c: int, pick: int) -> None:
        """A stopped handler ignores its stop: its outcome is committed without it."""

        def stopping(x: Consumer) -> list[Execution[Envelope]]:
            return [e for e in x.executions if e.phase is Phase.STOPPING]

        consumer = self._consumer(c, lambda x: bool(stopping(x)))
        execution = stopping(consumer)[pick % len(stopping(consumer))]
        with self.step(f"{consumer.worker_id} abandons a handler"):
            outcome = self._outcome(consumer, execution, "stopped", 0.0)
            if consumer.executions.abandon(execution, outcome):
                consumer.completion.append(execution)
                consumer.detached.append(execution)

    @precondition(lambda self: any(c.completion and c.lost_commit is None for c in self.consumers))
    @rule(c=CONSUMER, reply=REPLY)
    def commit(self, c: int, reply: str) -> None:
        consumer = self._consumer(c, lambda x: bool(x.completion) and x.lost_commit is None)
        with self.step(f"{consumer.worker_id} commits outcomes, reply {reply}"):
            if reply == "lost":
                batch, consumer.completion = consumer.completion, []
                self._finish(consumer, batch)
                consumer.lost_commit = batch
            else:
                self._commit(consumer)

    @precondition(lambda self: any(c.lost_commit is not None for c in self.consumers))
    @rule(c=CONSUMER)
    def commit_is_retried(self, c: int) -> None:
        consumer = self._consumer(c, lambda x: x.lost_commit is not None)
        with self.step(f"{consumer.worker_id} retries its commit"):
            batch = consumer.lost_commit or []
            consumer.lost_commit = None
            self._committed(consumer, batch, self._finish(consumer, batch))

    @precondition(lambda self: any(len(c.executions) for c in self.consumers))
    @rule(c=CONSUMER, reply=REPLY)
    def heartbeats(self, c: int, reply: str) -> None:
        consumer = self._consumer(c, lambda x: bool(len(x.executions)))
        with self.step(f"{consumer.worker_id} heartbeats, reply {reply}"):
            leases = consumer.executions.leases()
            owned = self._heartbeat(consumer, leases)
            if reply == "lost":
                consumer.lost_heartbeat = leases
            else:
                self._heartbeat_answer(consumer, leases, owned)

    @precondition(lambda self: any(c.lost_heartbeat is not None for c in self.consumers))
    @rule(c=CONSUMER)
    def heartbeat_is_retried(self, c: int) -> None:
        consumer = self._consumer(c, lambda x: x.lost_heartbeat is not None)
        with self.step(f"{consumer.worker_id} retries its heartbeat"):
            leases = consumer.lost_heartbeat or []
            consumer.lost_heartbeat = None
            self._heartbeat_answer(consumer, leases, self._heartbeat(consumer, leases))

    @precondition(lambda self: any(c.can_claim and c.running() for c in self.consumers))
    @rule(c=CONSUMER)
    def shutdown_begins(self, c: int) -> None:
        """SIGTERM: stop consuming, hand back what waits, ask the handlers to stop."""
        consumer = self._consumer(c, lambda x: x.can_claim and bool(x.running()))
        with self.step(f"{consumer.worker_id} shuts down"):
            consumer.shutting_down = True
            waiting, consumer.inbox = consumer.inbox, []
            for envelope in [*waiting, *consumer.executions.drain_held()]:
                self._settle(consumer, envelope, "requeue", "handed back", None)
            for execution in consumer.executions:
                consumer.executions.stop(execution, "shutdown")

    @precondition(lambda self: any(c.shutting_down and c.idle for c in self.consumers))
    @rule(c=CONSUMER)
    def shutdown_completes(self, c: int) -> None:
        consumer = self._consumer(c, lambda x: x.shutting_down and x.idle)
        with self.step(f"{consumer.worker_id} exits; a new one starts"):
            self.broker.channel_closed(consumer.index)
            self._restart(consumer)

    @precondition(lambda self: any(c.holds() for c in self.consumers))
    @rule(c=CONSUMER)
    def consumer_crashes(self, c: int) -> None:
        """kill -9: its deliveries go back to the queue, its rows stay PROCESSING."""
        consumer = self._consumer(c, lambda x: bool(x.holds()))
        with self.step(f"{consumer.worker_id} crashes; a new one starts"):
            self.broker.channel_closed(consumer.index)
            self._restart(consumer)

    # -- rules: time, the rescue, the operator, retention ------------------------------------

    @rule(seconds=st.sampled_from([4.0, 45.0, 200.0]), heartbeats=st.booleans())
    def time_passes(self, seconds: float, heartbeats: bool) -> None:
        """``heartbeats``: every live consumer kept heartbeating meanwhile; else they
        were all paused (or partitioned) for that long."""
        with self.step(f"{seconds:g}s pass, heartbeats {'kept' if heartbeats else 'paused'}"):
            self.db(self._time_passes(seconds))
            if heartbeats:
                for consumer in self.consumers:
                    self._beat(consumer)

    @precondition(
        lambda self: any(
            r.status == S.PROCESSING and r.stale for r in self.current().tasks.values()
        )
    )
    @rule()
    def rescue(self) -> None:
        with self.step("rescue"):
            rows = self.db(rescue_stale(self.pool, STALE_AFTER))
            self.effects.rescued.update(row["id"] for row in rows)

    @precondition(
        lambda self: any(
            r.status in (S.PENDING, S.FAILED, S.DONE) for r in self.current().tasks.values()
        )
    )
    @rule(pick=PICK)
    def operator_replays(self, pick: int) -> None:
        candidates = self._in_creation_order(
            lambda row: row.status in (S.PENDING, S.FAILED, S.DONE)
        )
        task_id = candidates[pick % len(candidates)]
        force = self._status(task_id) == S.DONE
        with self.step(f"operator replays a {self._status(task_id)} task"):
            result = self.db(self._replay(task_id, force))
            if task_id in result.replayed:
                self.effects.replayed.add(task_id)
                self.cancels.pop(task_id, None)  # the operator's explicit override

    @precondition(lambda self: any(r.status in TERMINAL for r in self.current().tasks.values()))
    @rule(older_than=st.sampled_from([100.0, 1000.0]))
    def retention_sweeps(self, older_than: float) -> None:
        with self.step(f"retention sweeps rows older than {older_than:g}s"):
            self.db(self._sweep(older_than))
            self.effects.swept = True

    # -- invariants ---------------------------------------------------------------------

    def _owners(self) -> dict[uuid.UUID, list[Consumer]]:
        """The consumers whose live executions hold a PROCESSING task's current lease
        number (the row's worker or not)."""
        snapshot = self.current()
        owners: dict[uuid.UUID, list[Consumer]] = {}
        for consumer in self.consumers:
            for execution in consumer.executions:
                row = snapshot.tasks.get(execution.task_id)
                if (
                    execution.phase in (Phase.RUNNING, Phase.STOPPING, Phase.FINISHED)
                    and row is not None
                    and row.status == S.PROCESSING
                    and row.lease == execution.lease
                ):
                    owners.setdefault(execution.task_id, []).append(consumer)
        return owners

    @invariant()
    def at_most_one_owner(self) -> None:
        snapshot = self.current()
        for task_id, owners in self._owners().items():
            row = snapshot.tasks[task_id]
            fenced_in = [c.worker_id for c in owners if c.worker_id == row.worker_id]
            if len(fenced_in) > 1:
                self.fail(
                    f"(1) task {task_id} has {len(fenced_in)} owners under lease "
                    f"{row.lease}: {fenced_in}"
                )
            # Another worker under the same lease number: only one whose claim of that
            # lease a failover undid (its writes carry its own id, which the fence refuses).
            for consumer in owners:
                if consumer.worker_id != row.worker_id and (
                    (consumer.worker_id, task_id, row.lease) not in self.undone_claims
                ):
                    self.fail(
                        f"(1) task {task_id} is run by {consumer.worker_id} under the "
                        f"current lease {row.lease} but the row names {row.worker_id}"
                    )

    @invariant()
    def terminal_is_never_overwritten(self) -> None:
        """And every other change is one this step's actors may write."""
        if self.previous is None:
            return
        now, effects = self.current(), self.effects
        for task_id, after in now.tasks.items():
            before = self.previous.tasks.get(task_id)
            if before is None:
                if task_id not in effects.created:
                    self.fail(f"task {task_id} appeared from nowhere")
                continue
            history = self.history.get(task_id)
            claims = effects.claims[task_id]
            if after.lease != before.lease + claims:
                self.fail(
                    f"the fence of task {task_id} went from {before.lease} to {after.lease} "
                    f"with {claims} claim(s) in this step: each claim must take a new lease "
                    f"and nothing else may change it"
                )
            if before.status == after.status:
                continue
            change = f"task {task_id} went {before.status} -> {after.status} (history {history})"
            if before.status in TERMINAL:
                if task_id not in effects.replayed or after.status != S.NEW:
                    self.fail(f"(2) a terminal status was overwritten: {change}")
                continue
            # A drain round is one step of many actors: a claim and the outcome of the
            # attempt it started may both fall in it.
            through_processing = before.status == S.PROCESSING or claims > 0
            if after.status == S.PROCESSING:
                allowed = claims > 0
            elif through_processing and (task_id in effects.finished or task_id in effects.rescued):
                allowed = True
            elif before.status == S.PROCESSING:
                allowed = False
            elif after.status == S.CANCELLED:
                allowed = task_id in effects.cancelled
            else:  # NEW <-> PENDING: the relay's publish or refusal, a replay, the watch
                allowed = bool({task_id} & (effects.relayed | effects.replayed | effects.requeued))
            if not allowed:
                self.fail(f"no actor of this step may write that: {change}")
        for task_id, before in self.previous.tasks.items():
            if task_id not in now.tasks and not (effects.swept and before.status in TERMINAL):
                self.fail(f"task {task_id} ({before.status}) vanished")

    @invariant()
    def outcome_written_only_by_owner(self) -> None:
        if self.effects.fence:
            self.fail("(3) an outcome was written by a non-owner: " + "; ".join(self.effects.fence))

    @invariant()
    def answered_cancel_is_honoured(self) -> None:
        now = self.current()
        for task_id, cancel in self.cancels.items():
            row = now.tasks.get(task_id)
            if row is None:
                continue  # swept by retention, terminal
            said = (
                f"(4) task {task_id} was {cancel.status} under lease {cancel.lease} when a "
                f"cancel was answered at step {cancel.step}; history {self.history[task_id]}"
            )
            if row.lease != cancel.lease:
                self.fail(f"{said}; it was claimed again (lease {row.lease})")
            if row.status in (S.NEW, S.PENDING):
                self.fail(f"{said}; it is {row.status} again: another attempt will start")
            if cancel.status != S.PROCESSING and row.status != S.CANCELLED:
                self.fail(f"{said}; it is {row.status}")

    @invariant()
    def a_retry_waits_for_its_own_row(self) -> None:
        """A NEW task is claimed only by the message of its newest outbox row: an older
        message (the attempt before a retry, redelivered) must not start the retry
        before its backoff is over."""
        if self.previous is None:
            return
        for task_id, outbox_id in self.effects.claimed_by:
            before = self.previous.tasks.get(task_id)
            newest = self.previous.newest.get(task_id, 0)
            if before is not None and before.status == S.NEW and outbox_id < newest:
                self.fail(
                    f"task {task_id} was claimed while NEW by the message of outbox row "
                    f"{outbox_id}, older than its newest row {newest}; history "
                    f"{self.history.get(task_id)}"
                )

    @invariant()
    def acks_have_proof(self) -> None:
        now = self.current()
        for s in self.effects.settled:
            task_id, outbox_id = s.envelope.parsed.task_id, s.envelope.parsed.outbox_id
            what = (
                f"{s.worker_id} {s.how}ed the message of task {task_id} (outbox row "
                f"{outbox_id}; {s.basis}, status {s.status}); history "
                f"{self.history.get(task_id)}"
            )
            if s.how == "dead-letter" and task_id in now.tasks:
                self.fail(f"a message of an existing task was dead-lettered: {what}")
            if s.how != "ack":
                continue
            if s.basis == "committed" and s.status is not None:
                continue  # its outcome is written
            if s.basis == "claim refused" and (
                s.status in TERMINAL
                or s.status == S.PROCESSING
                or (s.status == S.NEW and outbox_id < now.newest.get(task_id, 0))
            ):
                continue  # terminal, owned, or superseded by a newer outbox row
            self.fail(f"acked without proof that its work is done or not needed: {what}")

    @invariant()
    def every_task_has_a_way_forward(self) -> None:
        now = self.current()
        in_flight = self.broker.in_flight()
        for task_id, row in now.tasks.items():
            if row.status not in (S.NEW, S.PENDING) or now.unpublished.get(task_id):
                continue
            mine = [m for m in in_flight if m.task_id == task_id]
            newest = now.newest.get(task_id, 0)
            if row.status == S.PENDING and mine:
                continue
            # A dead letter of the newest row: the watch will send the task again.
            if row.status == S.PENDING and any(
                m.task_id == task_id and m.outbox_id >= newest for m in self.broker.watch
            ):
                continue
            if row.status == S.NEW and any(m.outbox_id >= newest for m in mine):
                continue
            self.fail(
                f"orphan: task {task_id} is {row.status} with no unpublished outbox row and "
                f"no message that can claim it (messages for outbox rows "
                f"{[m.outbox_id for m in mine]}, newest row {newest}, dead letters "
                f"{[m.outbox_id for m in self.broker.dead if m.task_id == task_id]}, watched "
                f"{[m.outbox_id for m in self.broker.watch if m.task_id == task_id]}); "
                f"history {self.history.get(task_id)}"
            )

    def _check_all(self) -> None:
        self.at_most_one_owner()
        self.terminal_is_never_overwritten()
        self.outcome_written_only_by_owner()
        self.answered_cancel_is_honoured()
        self.a_retry_waits_for_its_own_row()
        self.acks_have_proof()
        self.every_task_has_a_way_forward()

    # -- the end: drain until quiescent, then every task is finished -------------------------

    def teardown(self) -> None:
        if self.broken:
            return  # a failure is being reported: do not bury it under another
        for n in range(DRAIN_ROUNDS):
            with self.step(f"drain round {n}"):
                moved = self._drain_round()
            self._check_all()
            if not moved:
                break
        else:
            self.fail(f"the system still moved after {DRAIN_ROUNDS} drain rounds")
        unfinished = {
            task_id: row
            for task_id, row in self.current().tasks.items()
            if row.status not in TERMINAL
        }
        if unfinished:
            self.fail(
                "after the drain, tasks are not finished: "
                + "; ".join(
                    f"{task_id} {row} history {self.history.get(task_id)}"
                    for task_id, row in unfinished.items()
                )
            )

    def _drain_round(self) -> bool:
        """One round of every process doing all it can; True if anything moved."""
        moved = False
        for consumer in self.consumers:
            if consumer.lost_claim is not None:
                batch, consumer.lost_claim = consumer.lost_claim, None
                self._claimed(consumer, batch, self._claim(consumer, batch))
                moved = True
            if consumer.lost_commit is not None:
                batch_, consumer.lost_commit = consumer.lost_commit, None
                self._committed(consumer, batch_, self._finish(consumer, batch_))
                moved = True
            if consumer.lost_heartbeat is not None:
                leases, consumer.lost_heartbeat = consumer.lost_heartbeat, None
                self._heartbeat_answer(consumer, leases, self._heartbeat(consumer, leases))
        for consumer in self.consumers:
            for execution in consumer.running():
                end = "stopped" if execution.phase is Phase.STOPPING else "done"
                self._end(consumer, execution, self._outcome(consumer, execution, end, 0.0))
                moved = True
            consumer.detached.clear()
            if consumer.completion:
                self._commit(consumer)
                moved = True
            self._beat(consumer)
        for consumer in list(self.consumers):
            if consumer.shutting_down and consumer.idle:
                self.broker.channel_closed(consumer.index)
                self._restart(consumer)
                moved = True
        receivers = [c for c in self.consumers if not c.shutting_down]
        for n, message in enumerate(list(self.broker.ready) if receivers else []):
            consumer = receivers[n % len(receivers)]
            consumer.inbox.append(self.broker.deliver(message, consumer.index))
            moved = True
        for consumer in self.consumers:
            while consumer.inbox and consumer.can_claim:
                batch = self._take_batch(consumer, 8, 0)
                if batch:
                    self._claimed(consumer, batch, self._claim(consumer, batch))
                moved = True
        while self.broker.watch:
            self._watch(self.broker.watch.pop(0))
            moved = True
        if not any(len(c.executions) or c.inbox for c in self.consumers):
            # Nothing runs: let the clock pass every staleness and backoff.
            self.db(self._time_passes(1000.0))
            rescued = self.db(rescue_stale(self.pool, STALE_AFTER))
            self.effects.rescued.update(row["id"] for row in rescued)
            while rows := self.db(self._relay_batch(100, "published")):
                for row in rows:
                    self.broker.publish(row)
                self.effects.relayed.update(row["task_id"] for row in rows)
                moved = True
            moved = moved or bool(rescued)
        return moved


@pytest.mark.timeout(900)  # a failure's shrinking takes a while; a pass is well under a minute
def test_delivery_protocol(db_settings: DatabaseSettings) -> None:
    loop = Loop()
    started = time.monotonic()
    ProtocolMachine.examples = ProtocolMachine.total_steps = 0
    try:
        pool = loop.run(create_pool(db_settings, min_size=1, max_size=4))
        try:
            ProtocolMachine.environment = Environment(loop, pool)
            run_state_machine_as_test(ProtocolMachine, settings=SETTINGS)
        finally:
            ProtocolMachine.environment = None
            loop.run(pool.close())
    finally:
        loop.close()
        print(
            f"protocol property test: {ProtocolMachine.examples} examples, "
            f"{ProtocolMachine.total_steps} steps, {time.monotonic() - started:.1f}s"
        )
