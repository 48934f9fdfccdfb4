"""scheduled tasks: tasks.run_at, and the outbox claim index ordered by due time

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

The relay used to walk unpublished rows in id order and skip those not yet due. With
scheduled tasks, rows due tomorrow would sit at the front of that walk on every claim;
an index on (available_at, id) starts the walk at the first due row and stops at the
first one in the future, and its first entry is the next moment the relay must wake.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column without a default: a catalogue change, instant at any size.
    op.execute("ALTER TABLE tasks ADD COLUMN IF NOT EXISTS run_at timestamptz")
    # The index is built CONCURRENTLY, outside the migration's transaction: a plain
    # CREATE INDEX would block every insert into the outbox (so every task creation)
    # for as long as the build takes on a large table. Written to be run again: a
    # concurrent build that failed leaves an invalid index behind, dropped here first,
    # and the column above is already committed by then.
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_outbox_due")
        op.execute(
            "CREATE INDEX CONCURRENTLY ix_outbox_due ON outbox (available_at, id)"
            " WHERE published_at IS NULL"
        )
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_outbox_unpublished")


def downgrade() -> None:
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.drop_index("ix_outbox_due", table_name="outbox")
    op.drop_column("tasks", "run_at")
