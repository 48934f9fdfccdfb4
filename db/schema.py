"""Table definitions: the single source of truth for the schema.

Migrations under ``db/alembic`` create exactly this (a test compares the migrated
database against this metadata), and the hand-written SQL in ``db.tasks`` and
``db.outbox`` reads and writes these columns.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from taskbox.db.states import TaskStatus

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

OUTBOX_KINDS = ("task.created", "task.retry", "task.replay")

_status_list = ", ".join(f"'{s.value}'" for s in TaskStatus)
_kind_list = ", ".join(f"'{k}'" for k in OUTBOX_KINDS)

tasks = Table(
    "tasks",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("type", Text, nullable=False),
    Column("payload", JSONB, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'NEW'")),
    Column("priority", SmallInteger, nullable=False, server_default=text("0")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_attempts", Integer, nullable=False, server_default=text("3")),
    Column("result", JSONB),
    Column("error", JSONB),
    Column("idempotency_key", Text),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("heartbeat_at", DateTime(timezone=True)),
    Column("worker_id", Text),
    # When a scheduled task may run; NULL for one that runs as soon as it can.
    Column("run_at", DateTime(timezone=True)),
    # The fencing token of the current claim: each claim adds one, nothing lowers it.
    Column("lease", BigInteger, nullable=False, server_default=text("0")),
    # sha256 of the create request a keyed task was made from (db.tasks.request_digest).
    Column("request_digest", LargeBinary),
    # The Taskbox queue the task is routed to (taskbox.runtime.queues): the relay
    # publishes its messages to that queue's AMQP queue. Fixed at creation.
    Column("queue", Text, nullable=False, server_default=text("'default'")),
    # The schedule tick this task was created for (db.schedules): the schedule's name
    # and the fire time; a "run now" task has the name and no fire time.
    Column("schedule_name", Text),
    Column("schedule_fire_at", DateTime(timezone=True)),
    # Where the task's outcome is posted when it ends (a webhook of its own, signed with
    # WEBHOOK_CALLBACK_SECRET); fixed at creation.
    Column("callback_url", Text),
    CheckConstraint(f"status IN ({_status_list})", name="status"),
    CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
    CheckConstraint("max_attempts >= 1", name="max_attempts"),
    CheckConstraint("attempts >= 0", name="attempts"),
)

# Listing is newest first with a (created_at, id) keyset; the status variant serves
# the common "show me what failed" filter without scanning everything.
Index("ix_tasks_created_at_id", tasks.c.created_at.desc(), tasks.c.id.desc())
Index(
    "ix_tasks_status_created_at_id",
    tasks.c.status,
    tasks.c.created_at.desc(),
    tasks.c.id.desc(),
)
# Most tasks carry no key: a partial index costs them nothing at insert.
Index(
    "uq_tasks_idempotency_key",
    tasks.c.idempotency_key,
    unique=True,
    postgresql_where=text("idempotency_key IS NOT NULL"),
)
# Exactly one task per schedule tick: a second scheduler, or one retrying after a crash,
# can never insert the same (schedule, fire time) again. Also how a schedule's last
# ticks are found.
Index(
    "uq_tasks_schedule_tick",
    tasks.c.schedule_name,
    tasks.c.schedule_fire_at,
    unique=True,
    postgresql_where=text("schedule_name IS NOT NULL"),
)
# The rescue of stuck tasks only ever looks at running ones.
Index(
    "ix_tasks_heartbeat_at_processing",
    tasks.c.heartbeat_at,
    postgresql_where=text("status = 'PROCESSING'"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column(
        "task_id",
        Uuid,
        ForeignKey("tasks.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("kind", Text, nullable=False),
    Column("body", JSONB, nullable=False),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("available_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("published_at", DateTime(timezone=True)),
    Column("publish_attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    # Set to the task's queue when the relay came to publish the row while that queue
    # was paused: a parked row waits, out of the claim's index, until a relay unparks it
    # after the resume.
    Column("parked_queue", Text),
    CheckConstraint(f"kind IN ({_kind_list})", name="kind"),
)

# The relay's claim reads only unpublished rows, oldest due first: a partial index keeps
# the claim cheap however large the published history grows, and ordering it by due
# time keeps rows scheduled for later out of the claim's way. Its first entry is also
# the next moment the relay has to wake for. Parked rows (a paused queue's) are left
# out, so a paused backlog never lies in the way of the other queues' claims.
Index(
    "ix_outbox_due",
    outbox.c.available_at,
    outbox.c.id,
    postgresql_where=text("published_at IS NULL AND parked_queue IS NULL"),
)
# Parked rows only: which queues have some (a skip scan over the first column), and a
# resumed queue's rows in due order.
Index(
    "ix_outbox_parked",
    outbox.c.parked_queue,
    outbox.c.available_at,
    outbox.c.id,
    postgresql_where=text("published_at IS NULL AND parked_queue IS NOT NULL"),
)
# Deleting a task (retention) cascades to its outbox rows through this index.
Index("ix_outbox_task_id", outbox.c.task_id)

# The consumers seen per queue: each consumer upserts one row per queue it serves on
# its heartbeat, so the api can say which queues have a consumer without asking
# RabbitMQ. A row older than a few heartbeats is a consumer gone; retention deletes it.
queue_consumers = Table(
    "queue_consumers",
    metadata,
    Column("queue", Text, primary_key=True),
    Column("consumer", Text, primary_key=True),
    Column("seen_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
)

# The paused queues, one row each: the relay parks their due outbox rows instead of
# publishing them, and consumers stop taking their messages. Deleted on resume.
queue_pauses = Table(
    "queue_pauses",
    metadata,
    Column("queue", Text, primary_key=True),
    Column("paused_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("paused_by", Text, nullable=False),
    Column("reason", Text, nullable=False),
)

# Every pause and resume, who and why: the audit trail, kept.
queue_events = Table(
    "queue_events",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("queue", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("actor", Text, nullable=False),
    Column("reason", Text, nullable=False),
    CheckConstraint("action IN ('pause', 'resume')", name="action"),
)
Index("ix_queue_events_queue_id", queue_events.c.queue, queue_events.c.id)
# Periodic tasks (taskbox.schedules): one row per schedule, declared in code
# (source 'code', written by the scheduler from its task modules) or over the API.
# next_fire_at is the earliest tick not yet turned into a task; the scheduler creates
# the tick's task and advances it in one transaction (db.schedules).
schedules = Table(
    "schedules",
    metadata,
    Column("name", Text, primary_key=True),
    Column("task_type", Text, nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("cron", Text),
    Column("interval_seconds", Double),
    Column("timezone", Text, nullable=False, server_default=text("'UTC'")),
    Column("priority", SmallInteger, nullable=False, server_default=text("0")),
    Column("queue", Text, nullable=False, server_default=text("'default'")),
    Column("max_attempts", Integer, nullable=False, server_default=text("3")),
    Column("catch_up", Text, nullable=False, server_default=text("'skip'")),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("source", Text, nullable=False, server_default=text("'api'")),
    Column("next_fire_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint("(cron IS NULL) <> (interval_seconds IS NULL)", name="timing"),
    CheckConstraint("catch_up IN ('skip', 'all')", name="catch_up"),
    CheckConstraint("source IN ('api', 'code')", name="source"),
    CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
    CheckConstraint("max_attempts >= 1", name="max_attempts"),
)
# The scheduler's claim: the running schedules that are due, earliest first.
Index(
    "ix_schedules_next_fire_at",
    schedules.c.next_fire_at,
    postgresql_where=text("NOT paused"),
)

# Every bulk cancel and retry (db.actions), dry runs included: what it selected, who
# and why, and its progress, updated after each chunk. The audit trail, kept.
task_actions = Table(
    "task_actions",
    metadata,
    Column("id", BigInteger, Identity(always=False), primary_key=True),
    Column("action", Text, nullable=False),
    Column("filter", JSONB, nullable=False),
    Column("reason", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("dry_run", Boolean, nullable=False, server_default=text("false")),
    Column("matched", BigInteger, nullable=False, server_default=text("0")),
    Column("changed", BigInteger, nullable=False, server_default=text("0")),
    Column("skipped", BigInteger, nullable=False, server_default=text("0")),
    Column("state", Text, nullable=False, server_default=text("'running'")),
    Column("error", Text),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("finished_at", DateTime(timezone=True)),
    CheckConstraint("action IN ('cancel', 'retry')", name="action"),
    CheckConstraint("state IN ('running', 'done', 'failed')", name="state"),
)

# Webhook subscriptions: where to post which task outcomes. The secrets sign deliveries
# (HMAC needs the key itself, so it is stored as is, and shown only once, at creation);
# after a rotation the previous one signs too until previous_secret_expires_at.
# task_types / queues NULL: every type / queue.
webhooks = Table(
    "webhooks",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("url", Text, nullable=False),
    Column("events", ARRAY(Text), nullable=False),
    Column("task_types", ARRAY(Text)),
    Column("queues", ARRAY(Text)),
    Column("secret", Text, nullable=False),
    Column("previous_secret", Text),
    Column("previous_secret_expires_at", DateTime(timezone=True)),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    CheckConstraint(
        "cardinality(events) >= 1"
        " AND events <@ ARRAY['task.done', 'task.failed', 'task.cancelled']::text[]",
        name="events",
    ),
)

# The webhook outbox: one row per (outcome, destination), written by the trigger of
# migration 0009 in the very transaction that commits the outcome, so a committed
# outcome's webhook cannot be lost. webhook_id NULL: the task's own callback_url. The
# body is the event document, fixed at enqueue; a retry sends it again under the same
# id. A worker leases a row by moving next_attempt_at past its attempt's timeout.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=text("gen_random_uuid()")),
    Column("webhook_id", Uuid, ForeignKey("webhooks.id", ondelete="CASCADE")),
    Column("url", Text, nullable=False),
    Column("task_id", Uuid, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("event", Text, nullable=False),
    Column("body", JSONB, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column(
        "next_attempt_at", DateTime(timezone=True), nullable=False, server_default=text("now()")
    ),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("delivered_at", DateTime(timezone=True)),
    CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
)
# The workers' claim: due pending rows only, however long the delivered history grows.
Index(
    "ix_webhook_deliveries_due",
    webhook_deliveries.c.next_attempt_at,
    postgresql_where=text("status = 'pending'"),
)
# A subscription's deliveries, newest first; and the cascades from webhooks and tasks.
Index(
    "ix_webhook_deliveries_webhook_id_created_at",
    webhook_deliveries.c.webhook_id,
    webhook_deliveries.c.created_at.desc(),
)
Index("ix_webhook_deliveries_task_id", webhook_deliveries.c.task_id)

# Every attempt of a delivery, kept with it: what the receiver answered (a 1 KiB prefix
# of its body at most) or why there was no answer. ``attempt`` restarts at 1 after a
# replay; ``id`` orders them all.
webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", BigInteger, Identity(always=False)),
    Column(
        "delivery_id",
        Uuid,
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("attempt", Integer, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("status_code", Integer),
    Column("latency_ms", Double, nullable=False),
    Column("error", Text),
    Column("response_body", Text),
    PrimaryKeyConstraint("id"),
    CheckConstraint("octet_length(response_body) <= 1024", name="response_body"),
)
Index("ix_webhook_attempts_delivery_id_id", webhook_attempts.c.delivery_id, webhook_attempts.c.id)
