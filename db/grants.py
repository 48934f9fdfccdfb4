"""What each Taskbox process may do in Postgres: the grant matrix ``python -m db roles`` applies.

Worked out from the SQL each process runs (``db.tasks``, ``db.outbox``, ``db.execution``,
``db.retention``, ``db.overview``); a change to that SQL that reads or writes another
table or column changes this file in the same commit (tests/integration/test_roles.py
runs those code paths as the roles and fails otherwise).

Reads are granted table-wide: every process reads ``tasks`` and ``outbox`` anyway, and
column-level SELECT would break on the first query that reads one more column while
hiding nothing worth hiding. Table-wide INSERT lets a migration add a nullable or
defaulted column (as ``run_at`` was) without a re-grant. UPDATE is granted per
column, because that is where the processes really differ: only the consumer writes a
result or an error, nobody rewrites a payload, a type, a priority or an idempotency key.

The api's one change to an existing task is the cancel (NEW/PENDING -> CANCELLED,
PROCESSING -> cancel_requested), so it updates no column of ``tasks`` at all and calls
``cancel_task(uuid)`` instead, a SECURITY DEFINER function of migration 0004 that runs as
the tables' owner and performs exactly that transition. An UPDATE grant on ``status``
would let it make any change (mark a task DONE, send a finished one back to NEW), and a
row-level security policy could limit the statuses a row may have after an update, not
the transition from the one before.

Nothing else here needs privileges on functions: ``pg_notify``, the advisory-lock
functions, ``gen_random_uuid`` and ``now`` are executable by PUBLIC. Foreign-key checks and the
``ON DELETE CASCADE`` from ``tasks`` to ``outbox`` run as the tables' owner, so they need no
grant of their own. Deliberately absent everywhere: TRUNCATE, REFERENCES, TRIGGER, sequence
UPDATE (setval) and any DDL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Process = Literal["api", "relay", "consumer"]
PROCESSES: tuple[Process, ...] = ("api", "relay", "consumer")


@dataclass(frozen=True, slots=True)
class TableGrant:
    table: str
    privileges: tuple[str, ...] = ()  # table-wide: SELECT, INSERT, DELETE
    update_columns: tuple[str, ...] = ()  # UPDATE on these columns only
    # USAGE on the table's identity sequence: nextval for rows it inserts without an id.
    identity_sequence: bool = False


GRANTS: dict[Process, tuple[TableGrant, ...]] = {
    # Creates tasks and their task.created outbox rows (one statement, db.tasks), reads
    # and lists tasks, and cancels through cancel_task(). A cancelled task's unsent row
    # is closed by the relay's claim, so the api only ever adds outbox rows.
    "api": (
        TableGrant("tasks", ("SELECT", "INSERT")),
        TableGrant("outbox", ("SELECT", "INSERT"), identity_sequence=True),
    ),
    # Claims due outbox rows (FOR UPDATE SKIP LOCKED needs UPDATE on some column, which
    # the publish bookkeeping has anyway), flips their tasks NEW -> PENDING and back on a
    # refusal, deletes what retention allows, reads the overview for its gauges and
    # `relay status`. It inserts nothing: `relay replay` runs as the owner (see README).
    "relay": (
        TableGrant(
            "outbox",
            ("SELECT", "DELETE"),
            update_columns=("published_at", "publish_attempts", "last_error", "available_at"),
        ),
        TableGrant("tasks", ("SELECT", "DELETE"), update_columns=("status", "updated_at")),
    ),
    # Claims, heartbeats, finishes and rescues tasks (every column an attempt owns); a
    # retry or a rescued task is a new outbox row, and the rescue reads the latest row's
    # trace context. It deletes nothing.
    "consumer": (
        TableGrant(
            "tasks",
            ("SELECT",),
            update_columns=(
                "status",
                "attempts",
                "lease",
                "worker_id",
                "started_at",
                "heartbeat_at",
                "finished_at",
                "updated_at",
                "result",
                "error",
                "cancel_requested",
            ),
        ),
        TableGrant("outbox", ("SELECT", "INSERT"), identity_sequence=True),
    ),
}

# EXECUTE on these functions (schema public, with their argument types), revoked from
# PUBLIC by the migration that creates them.
FUNCTIONS: dict[Process, tuple[str, ...]] = {
    "api": ("cancel_task(uuid)",),
    "relay": (),
    "consumer": (),
}

TABLES: tuple[str, ...] = ("tasks", "outbox")
