"""What each Taskbox process may do in Postgres: the grant matrix ``taskbox roles`` applies.

Worked out from the SQL each process runs (``db.tasks``, ``db.outbox``, ``db.execution``,
``db.retention``, ``db.overview``); a change to that SQL that reads or writes another
table or column changes this file in the same commit (tests/integration/test_roles.py
runs those code paths as the roles and fails otherwise).

Reads are granted table-wide to the processes that read a table: column-level SELECT
would break on the first query that reads one more column while hiding nothing worth
hiding. Writes are granted per column, because that is where a compromised process
could forge something: INSERT of only the columns a process's inserts set (every other
column takes its default, so a task is born NEW, unclaimed, without a result), UPDATE
of only the columns it changes. A migration that adds a column a process must write
changes this file, and the column is writable once the command reruns.

Two rules no column grant can express are enforced otherwise:

- Which outbox rows a process may add (the api only ``task.created``, the consumer only
  ``task.retry``; ``task.replay`` is the operator's, who runs as the owner): a
  restrictive row-level security policy per role (``insert_values``). A CHECK cannot
  see who inserts, and moving the api's one-statement creates into a SECURITY DEFINER
  function would put them behind a function call on the hottest path for nothing more.
- Which status changes the api may make: only the cancel (NEW/PENDING -> CANCELLED,
  PROCESSING -> cancel_requested) and the operator's replay (bulk retry), so the api
  updates no column of ``tasks`` at all and calls ``cancel_task(uuid)`` instead, a
  SECURITY DEFINER function of migration 0004 that runs as the tables' owner and
  performs exactly that transition, and ``replay_tasks()`` of 0010 for the replay
  (which also writes its ``task.replay`` outbox rows). A policy could
  limit the statuses a row may have after an update, not the transition from the one
  before, and would let the api set, say, PENDING -> PROCESSING.

Nothing else here needs privileges on functions: ``pg_notify``, the advisory-lock
functions, ``gen_random_uuid`` and ``now`` are executable by PUBLIC. Foreign-key checks
and the ``ON DELETE CASCADE`` from ``tasks`` to ``outbox`` run as the tables' owner, so they
need no grant of their own. Deliberately absent everywhere: TRUNCATE, REFERENCES,
TRIGGER, sequence UPDATE (setval) and any DDL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Process = Literal["api", "relay", "consumer"]
PROCESSES: tuple[Process, ...] = ("api", "relay", "consumer")


@dataclass(frozen=True, slots=True)
class TableGrant:
    table: str
    privileges: tuple[str, ...] = ()  # table-wide: SELECT, DELETE
    insert_columns: tuple[str, ...] = ()  # INSERT of these columns only; the rest default
    update_columns: tuple[str, ...] = ()  # UPDATE on these columns only
    # USAGE on the table's identity sequence: nextval for rows it inserts without an id.
    identity_sequence: bool = False
    # A text column and the only values this process's inserts may give it, enforced by
    # a restrictive row-level security policy on the table.
    insert_values: tuple[str, tuple[str, ...]] | None = None


# What makes and edits a schedule: the api (API schedules) and the relay's scheduler
# (code schedules, and each tick's advance) write the same columns.
SCHEDULES = TableGrant(
    "schedules",
    ("SELECT", "DELETE"),
    insert_columns=(
        "name",
        "task_type",
        "payload",
        "cron",
        "interval_seconds",
        "timezone",
        "priority",
        "queue",
        "max_attempts",
        "catch_up",
        "paused",
        "source",
        "next_fire_at",
    ),
    update_columns=(
        "task_type",
        "payload",
        "cron",
        "interval_seconds",
        "timezone",
        "priority",
        "queue",
        "max_attempts",
        "catch_up",
        "paused",
        "next_fire_at",
        "updated_at",
    ),
)

# Webhooks (db.webhooks): the api makes and edits subscriptions, reads deliveries and
# their attempts and replays failed ones; the relay's delivery worker reads the
# subscriptions (url, secrets), leases and settles deliveries and records attempts.
# Nobody inserts a delivery: the trigger of migration 0009 does, as the owner.
WEBHOOK_COLUMNS = ("url", "events", "task_types", "queues", "enabled")
API_WEBHOOKS = (
    TableGrant(
        "webhooks",
        ("SELECT", "DELETE"),
        insert_columns=(*WEBHOOK_COLUMNS, "secret"),
        update_columns=(
            *WEBHOOK_COLUMNS,
            "secret",
            "previous_secret",
            "previous_secret_expires_at",
            "updated_at",
        ),
    ),
    TableGrant(
        "webhook_deliveries", ("SELECT",), update_columns=("status", "attempts", "next_attempt_at")
    ),
    TableGrant("webhook_attempts", ("SELECT",)),
)
RELAY_WEBHOOKS = (
    TableGrant("webhooks", ("SELECT",)),
    TableGrant(
        "webhook_deliveries",
        ("SELECT",),
        update_columns=("status", "attempts", "next_attempt_at", "delivered_at"),
    ),
    TableGrant(
        "webhook_attempts",
        insert_columns=(
            "delivery_id",
            "attempt",
            "status_code",
            "latency_ms",
            "error",
            "response_body",
        ),
        identity_sequence=True,
    ),
)

GRANTS: dict[Process, tuple[TableGrant, ...]] = {
    # Creates tasks and their task.created outbox rows (one statement, db.tasks), reads
    # and lists tasks, and cancels through cancel_task(). It never reads the outbox, and
    # a cancelled task's unsent row is closed by the relay's claim, so it only adds rows.
    "api": (
        TableGrant(
            "tasks",
            ("SELECT",),
            # what a create sets: a grouped create brings its own ids, a keyed one its key
            insert_columns=(
                "id",
                "type",
                "payload",
                "priority",
                "max_attempts",
                "run_at",
                "idempotency_key",
                "request_digest",
                "queue",
                # a schedule's "run now" (db.schedules.run_now) carries its name
                "schedule_name",
                "schedule_fire_at",
                "callback_url",
            ),
        ),
        TableGrant(
            "outbox",
            insert_columns=("task_id", "kind", "body", "headers", "available_at"),
            identity_sequence=True,
            insert_values=("kind", ("task.created",)),
        ),
        # GET /api/v1/queues: the consumers seen per queue, the pauses and their trail;
        # pausing and resuming go through pause_queue() and resume_queue()
        TableGrant("queue_consumers", ("SELECT",)),
        TableGrant("queue_pauses", ("SELECT",)),
        TableGrant("queue_events", ("SELECT",)),
        # /api/v1/schedules: API schedules are made, edited and deleted here (the
        # statements themselves leave code schedules alone)
        SCHEDULES,
        # bulk cancel and retry (db.actions): the action's audit row and its progress;
        # the tasks themselves change through cancel_task() and replay_tasks()
        TableGrant(
            "task_actions",
            ("SELECT",),
            insert_columns=("action", "filter", "reason", "actor", "dry_run"),
            update_columns=("matched", "changed", "skipped", "state", "error", "finished_at"),
            identity_sequence=True,
        ),
        *API_WEBHOOKS,
    ),
    # Claims due outbox rows (FOR UPDATE SKIP LOCKED needs UPDATE on some column, which
    # the publish bookkeeping has anyway), flips their tasks NEW -> PENDING and back on a
    # refusal, deletes what retention allows, reads the overview for its gauges and
    # `relay status`. Its scheduler creates each schedule tick's task and task.created
    # row exactly as the api creates a task (db.tasks), advances the schedule, and writes
    # the code schedules of its task modules. `relay replay` runs as the owner (README).
    "relay": (
        TableGrant(
            "outbox",
            ("SELECT", "DELETE"),
            insert_columns=("task_id", "kind", "body", "headers", "available_at"),
            update_columns=(
                "published_at",
                "publish_attempts",
                "last_error",
                "available_at",
                "parked_queue",
            ),
            identity_sequence=True,
            insert_values=("kind", ("task.created",)),
        ),
        TableGrant(
            "tasks",
            ("SELECT", "DELETE"),
            insert_columns=(
                "type",
                "payload",
                "priority",
                "max_attempts",
                "run_at",
                "queue",
                "schedule_name",
                "schedule_fire_at",
            ),
            update_columns=("status", "updated_at"),
        ),
        # the scheduler: claims due schedules (FOR UPDATE), advances them, and writes
        # and deletes code schedules (db.schedules.sync_code_schedules)
        SCHEDULES,
        # `taskbox status` lists the queues and the consumers seen on them; retention
        # deletes the rows of consumers gone for a day
        TableGrant("queue_consumers", ("SELECT", "DELETE")),
        # the claim parks the rows of the paused queues
        TableGrant("queue_pauses", ("SELECT",)),
        *RELAY_WEBHOOKS,
    ),
    # Claims, heartbeats, finishes and rescues tasks (every column an attempt owns); a
    # retry, a rescued task and a dead-lettered one sent again are task.retry outbox
    # rows, which read the latest row's trace context. It deletes nothing.
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
        TableGrant(
            "outbox",
            ("SELECT",),
            insert_columns=("task_id", "kind", "body", "headers", "available_at"),
            identity_sequence=True,
            insert_values=("kind", ("task.retry",)),
        ),
        # one row per queue it serves, refreshed on its heartbeat (an upsert: SELECT
        # for the conflict target, UPDATE of the time)
        TableGrant(
            "queue_consumers",
            ("SELECT",),
            insert_columns=("queue", "consumer", "seen_at"),
            update_columns=("seen_at",),
        ),
        # which of its queues are paused, read every QUEUE_PAUSE_CHECK_INTERVAL
        TableGrant("queue_pauses", ("SELECT",)),
    ),
}

# EXECUTE on these functions (schema public, with their argument types), revoked from
# PUBLIC by the migration that creates them.
FUNCTIONS: dict[Process, tuple[str, ...]] = {
    "api": (
        "cancel_task(uuid)",
        "pause_queue(text, text, text)",
        "resume_queue(text, text, text, text)",
        "replay_tasks(uuid[], boolean, jsonb)",
    ),
    "relay": (),
    "consumer": (),
}

TABLES: tuple[str, ...] = (
    "tasks",
    "outbox",
    "queue_consumers",
    "queue_pauses",
    "queue_events",
    "schedules",
    "task_actions",
    "webhooks",
    "webhook_deliveries",
    "webhook_attempts",
)
