"""fencing lease and idempotent request digest

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

``tasks.lease`` is the fencing token of the current claim: every claim adds one and
nothing ever lowers it, so a writer holding an older lease (a consumer that lost its
task, a release whose reply was lost and is retried) can never match the row again.
The attempt count could not serve: a graceful release gives its attempt back, so the
same attempt number is handed out twice.

``tasks.request_digest`` fingerprints the create request a task with an idempotency
key was made from, so that a repeat is compared with the request as first accepted
rather than with a row an operator's replay has changed since.

Both are catalogue-only changes on Postgres 11 and newer (a constant default, a
nullable column): instant at any table size, no rewrite, no long lock.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE tasks ADD COLUMN IF NOT EXISTS lease bigint NOT NULL DEFAULT 0")
    op.execute("ALTER TABLE tasks ADD COLUMN IF NOT EXISTS request_digest bytea")


def downgrade() -> None:
    op.drop_column("tasks", "request_digest")
    op.drop_column("tasks", "lease")
