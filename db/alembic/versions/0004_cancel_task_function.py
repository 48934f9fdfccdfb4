"""cancel_task(): the api's one status change, as a function that runs as the owner

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08

A cancel turns NEW or PENDING into CANCELLED and flags a PROCESSING task
``cancel_requested``; a finished task stays as it is. That is the only change the api
makes to an existing task. Granting the api UPDATE on ``status`` (and the columns the
cancel touches) let it make any change at all: mark a task DONE, or send a finished one
back to NEW. This function performs exactly the cancel and runs as its owner (SECURITY
DEFINER), so the api role needs EXECUTE on it and no UPDATE on ``tasks``
(``python -m db roles`` grants that, see db/grants.py).

The guards are db.states.CANCEL_NOW (NEW, PENDING) and CANCEL_LATER (PROCESSING),
written out here because a migration must not change when the code does;
tests/integration/test_roles.py holds the function to them for every status.

A SQL function whose body is a string is parsed when called, so ``RETURNING *`` always
matches the current row type of ``tasks``: a later migration that adds a column need not
recreate it. search_path is pinned and the table qualified, as a SECURITY DEFINER
function must: a caller's search_path cannot slip its own objects in. EXECUTE is taken
from PUBLIC (which every role has by default), so only the roles granted it may cancel.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
CREATE OR REPLACE FUNCTION public.cancel_task(task_id uuid)
RETURNS SETOF public.tasks
LANGUAGE sql
VOLATILE STRICT SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
ROWS 1
AS $body$
UPDATE public.tasks
SET status = CASE WHEN status IN ('NEW', 'PENDING') THEN 'CANCELLED' ELSE status END,
    cancel_requested = cancel_requested OR status = 'PROCESSING',
    finished_at = CASE WHEN status IN ('NEW', 'PENDING') THEN now() ELSE finished_at END,
    updated_at = now()
WHERE id = $1 AND status IN ('NEW', 'PENDING', 'PROCESSING')
RETURNING *
$body$
"""
    )
    op.execute("REVOKE ALL ON FUNCTION public.cancel_task(uuid) FROM PUBLIC")
    op.execute(
        "COMMENT ON FUNCTION public.cancel_task(uuid) IS "
        "'Cancel a task: NEW/PENDING -> CANCELLED, PROCESSING -> cancel_requested; "
        "the api role''s only status change (migration 0004)'"
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS public.cancel_task(uuid)")
