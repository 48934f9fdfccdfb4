"""periodic tasks: schedules, and each tick's task keyed by (schedule, fire time)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

``schedules`` holds every schedule, those declared in code (``source = 'code'``, written
by the scheduler from its task modules) and those made over the API. ``next_fire_at``
is the one fire time not yet turned into a task: the scheduler creates a tick's task
and moves it on in one transaction.

``tasks.schedule_name`` / ``tasks.schedule_fire_at`` name the tick a task was created
for; the unique index on the pair is what makes a tick's task exist at most once,
whatever two schedulers or a crash do. A "run now" task carries the name with a NULL
fire time, so it never takes a tick's key. Nullable columns without a default are
catalogue-only changes; the index is built CONCURRENTLY, as 0002's, so that creating
it never blocks task creation on a large table.

Revises 0005: 0006 is being written in parallel and is relinked at merge.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # ALTER TABLE takes the table's ACCESS EXCLUSIVE lock for an instant; behind a long
    # transaction it would queue every insert behind it. Better to fail and be rerun.
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("ALTER TABLE tasks ADD COLUMN IF NOT EXISTS schedule_name text")
    op.execute("ALTER TABLE tasks ADD COLUMN IF NOT EXISTS schedule_fire_at timestamptz")
    op.execute(
        """
CREATE TABLE IF NOT EXISTS schedules (
    name text NOT NULL,
    task_type text NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}'::jsonb,
    cron text,
    interval_seconds double precision,
    timezone text NOT NULL DEFAULT 'UTC',
    priority smallint NOT NULL DEFAULT 0,
    queue text NOT NULL DEFAULT 'default',
    max_attempts integer NOT NULL DEFAULT 3,
    catch_up text NOT NULL DEFAULT 'skip',
    paused boolean NOT NULL DEFAULT false,
    source text NOT NULL DEFAULT 'api',
    next_fire_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_schedules PRIMARY KEY (name),
    CONSTRAINT ck_schedules_timing CHECK ((cron IS NULL) <> (interval_seconds IS NULL)),
    CONSTRAINT ck_schedules_catch_up CHECK (catch_up IN ('skip', 'all')),
    CONSTRAINT ck_schedules_source CHECK (source IN ('api', 'code')),
    CONSTRAINT ck_schedules_priority CHECK (priority BETWEEN 0 AND 9),
    CONSTRAINT ck_schedules_max_attempts CHECK (max_attempts >= 1)
)
"""
    )
    op.execute(
        "CREATE INDEX IF NOT EXISTS ix_schedules_next_fire_at ON schedules (next_fire_at)"
        " WHERE NOT paused"
    )
    with op.get_context().autocommit_block():
        # A failed concurrent build leaves an invalid index: dropped first, so a rerun heals.
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS uq_tasks_schedule_tick")
        op.execute(
            "CREATE UNIQUE INDEX CONCURRENTLY uq_tasks_schedule_tick"
            " ON tasks (schedule_name, schedule_fire_at) WHERE schedule_name IS NOT NULL"
        )


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS uq_tasks_schedule_tick")
    op.execute("DROP TABLE IF EXISTS schedules")
    op.drop_column("tasks", "schedule_fire_at")
    op.drop_column("tasks", "schedule_name")
