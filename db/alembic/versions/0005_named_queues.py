"""named queues: tasks.queue and the consumers seen per queue

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

``tasks.queue`` names the Taskbox queue a task is routed to; the relay publishes each
outbox row to its task's queue. Every task from before is in ``default``, whose AMQP
queue keeps the name it had (QUEUE_NAME), so the messages already in it are consumed
as before. A constant default on a NOT NULL column is a catalogue-only change on
Postgres 11 and newer: instant at any table size, no rewrite, no long lock.

``queue_consumers`` holds one row per consumer and queue it serves, refreshed on the
consumer's heartbeat: how the api (which never talks to RabbitMQ) tells a queue with
work and no consumer from one being served.

``cancel_task()`` (0004) returns ``SETOF tasks`` from a string body parsed at call time,
so it returns the new column without being recreated.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE tasks ADD COLUMN IF NOT EXISTS queue text NOT NULL DEFAULT 'default'")
    op.execute(
        """
CREATE TABLE IF NOT EXISTS queue_consumers (
    queue text NOT NULL,
    consumer text NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_queue_consumers PRIMARY KEY (queue, consumer)
)
"""
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS queue_consumers")
    op.drop_column("tasks", "queue")
