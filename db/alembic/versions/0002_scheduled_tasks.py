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
    op.add_column("tasks", sa.Column("run_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_outbox_due",
        "outbox",
        ["available_at", "id"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.drop_index("ix_outbox_unpublished", table_name="outbox")


def downgrade() -> None:
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["id"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.drop_index("ix_outbox_due", table_name="outbox")
    op.drop_column("tasks", "run_at")
