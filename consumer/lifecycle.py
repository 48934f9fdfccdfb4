"""The consumer's per-task lifecycle: one ``Execution`` per task it holds, with one phase
field and every transition in ``Executions``.

It decides, it does not do: it performs no I/O, so the consumer's worker calls it for
every event (a delivery, a claim, a heartbeat's answer, a handler's end, a commit) and
carries out what it answers, and the protocol's property test drives the very same
class against the real SQL.

::

        claim won                 stop(reason)               grace over
    ──────────────> RUNNING ─────────────────────> STOPPING ───────────┐
                      │  │                            │   │            │ abandon():
                      │  │ heartbeat: not ours (lost) │   │            │ outcome on the
                      │  └──────────────┐  ┌──────────┘   │            │ handler's behalf
                      │                 v  v              │            │
                      │                 LOST              │            │
                      │  handler ended   (removed; own    │ ended      │
                      └──────────────> message and held <─┘            │
                            finish()   ones claimed again)             │
                               │                                       │
                               v                                       │
                           FINISHED <──────────────────────────────────┘
                               │ committed(recorded)
                               v
                           SETTLED (removed): recorded -> own message acked (a retry
                           or a release has a new outbox row), held ones claimed again;
                           refused -> own message and held ones claimed again

A delivery of a task that has an Execution is held by it, never acked on the spot:
only the database can prove a delivery redundant (its task terminal, owned by another
live consumer, or superseded by a newer outbox row), and it can only say so once this
attempt's outcome is written or refused. So every held delivery goes back through the
claim, as does the attempt's own message when its outcome was refused or its
ownership lost: the claim then runs the task again or drops the message with proof.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Literal, TypeVar

from taskbox.db.execution import Outcome

StopReason = Literal["cancel", "shutdown", "lost"]

M = TypeVar("M")


class Phase(StrEnum):
    RUNNING = "running"  # the handler runs; heartbeats go out under the lease
    STOPPING = "stopping"  # asked to stop (cancel, shutdown); the handler has a grace
    FINISHED = "finished"  # the outcome is decided and waits for the completion commit
    LOST = "lost"  # the heartbeat showed the task is no longer ours: nothing to write
    SETTLED = "settled"  # the outcome was committed (or refused) and the messages settled


# phase -> the phases it may move to
_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.RUNNING: frozenset({Phase.STOPPING, Phase.FINISHED, Phase.LOST}),
    Phase.STOPPING: frozenset({Phase.FINISHED, Phase.LOST}),
    Phase.FINISHED: frozenset({Phase.SETTLED}),
    Phase.LOST: frozenset(),
    Phase.SETTLED: frozenset(),
}

Settlement = Literal["ack", "requeue"]


class IllegalTransition(RuntimeError):
    pass


@dataclass(eq=False, slots=True)
class Execution(Generic[M]):
    """One attempt of one task in this consumer: its lease, its message, its phase."""

    task_id: uuid.UUID
    lease: int
    message: M
    phase: Phase = Phase.RUNNING
    stop_reason: StopReason | None = None
    held: list[M] = field(default_factory=list)
    outcome: Outcome | None = None
    abandoned: bool = False  # the grace ran out: the outcome was written without the handler

    @property
    def occupies_slot(self) -> bool:
        return self.phase in (Phase.RUNNING, Phase.STOPPING)

    def _move(self, to: Phase) -> None:
        if to not in _NEXT[self.phase]:
            raise IllegalTransition(f"task {self.task_id}: {self.phase} -> {to}")
        self.phase = to


@dataclass(frozen=True, slots=True)
class Settled(Generic[M]):
    """What to do with an execution's messages once its outcome is committed or refused."""

    settle: list[tuple[M, Settlement]]
    claim_again: list[M]


class Executions(Generic[M]):
    """Every Execution of this consumer, by task id, and the only place phases change."""

    def __init__(self) -> None:
        self._by_task: dict[uuid.UUID, Execution[M]] = {}

    def __len__(self) -> int:
        return len(self._by_task)

    def __iter__(self) -> Iterator[Execution[M]]:
        return iter(list(self._by_task.values()))

    def get(self, task_id: uuid.UUID) -> Execution[M] | None:
        return self._by_task.get(task_id)

    @property
    def busy_slots(self) -> int:
        """Executions whose handler still counts against the concurrency."""
        return sum(1 for e in self._by_task.values() if e.occupies_slot)

    def leases(self) -> list[tuple[uuid.UUID, int]]:
        """What the heartbeat refreshes: every execution still holding its task."""
        return [(e.task_id, e.lease) for e in self._by_task.values()]

    # -- events -----------------------------------------------------------------------

    def receive(self, task_id: uuid.UUID, message: M) -> bool:
        """A delivery arrived. True: an execution of its task holds it until its outcome
        is written; False: nothing runs the task here, so the delivery goes to the claim."""
        execution = self._by_task.get(task_id)
        if execution is None:
            return False
        execution.held.append(message)
        return True

    def start(self, task_id: uuid.UUID, lease: int, message: M) -> Execution[M]:
        """The claim won the task under ``lease``."""
        if task_id in self._by_task:
            raise IllegalTransition(f"task {task_id} already has an execution here")
        execution = Execution(task_id, lease, message)
        self._by_task[task_id] = execution
        return execution

    def stop(self, execution: Execution[M], reason: StopReason) -> bool:
        """Ask a running handler to stop; True if the caller must cancel it now."""
        if execution.phase is not Phase.RUNNING or self._by_task.get(execution.task_id) is not (
            execution
        ):
            return False
        execution.stop_reason = reason
        execution._move(Phase.STOPPING)
        return True

    def finish(self, execution: Execution[M], outcome: Outcome) -> bool:
        """The handler ended (or its grace ran out) with ``outcome``; True if the outcome
        is to be committed, False if it comes too late (ownership lost, already
        abandoned) and is dropped."""
        if execution.phase not in (Phase.RUNNING, Phase.STOPPING):
            return False
        execution.outcome = outcome
        execution._move(Phase.FINISHED)
        return True

    def abandon(self, execution: Execution[M], outcome: Outcome) -> bool:
        """The handler ignored its timeout or stop past the grace: commit ``outcome`` for
        it; the coroutine is left to run detached and whatever it returns is dropped."""
        if not self.finish(execution, outcome):
            return False
        execution.abandoned = True
        return True

    def lose(self, task_id: uuid.UUID, lease: int) -> Execution[M] | None:
        """The heartbeat under ``lease`` found the task no longer ours. The execution (if
        it is still that one and its handler still runs) is removed: it writes nothing,
        and its own message and held ones go back through the claim. Returns it, for
        the caller to cancel its handler and re-queue ``claim_again_after_loss``."""
        execution = self._by_task.get(task_id)
        if execution is None or execution.lease != lease or not execution.occupies_slot:
            return None  # a newer claim's execution, or an outcome already on its way
        execution.stop_reason = "lost"
        execution._move(Phase.LOST)
        del self._by_task[task_id]
        return execution

    @staticmethod
    def claim_again_after_loss(execution: Execution[M]) -> list[M]:
        return [execution.message, *execution.held]

    def committed(self, execution: Execution[M], recorded: str | None) -> Settled[M]:
        """The completion commit that carried this execution's outcome is done;
        ``recorded`` is the status the fence let in (a cancel may have turned a retry or
        a release into CANCELLED), None if it refused the outcome."""
        execution._move(Phase.SETTLED)
        if self._by_task.get(execution.task_id) is execution:
            del self._by_task[execution.task_id]
        held, execution.held = execution.held, []
        assert execution.outcome is not None
        if recorded is None:
            # Someone else changed the task meanwhile: only the claim can tell whether
            # this message still has work to bring.
            return Settled([], [execution.message, *held])
        # Recorded: the task is finished, or (a retry, a release) has a new outbox row
        # of its own, so this message has nothing more to bring.
        return Settled([(execution.message, "ack")], held)

    def drain_held(self) -> list[M]:
        """At shutdown: every held delivery, to be handed back to the broker."""
        held: list[M] = []
        for execution in self._by_task.values():
            held.extend(execution.held)
            execution.held = []
        return held
