"""task events: a NOTIFY on 'taskbox_task_events' for every status change of a task

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

Waiters and streams in the api (api.task_events) learn that a task changed from these
notifications instead of polling. A trigger, rather than a NOTIFY in each writer, so
that every path that changes a status is covered, present and future: the relay's flip,
the consumer's claim and outcome, cancel_task(), the rescue, the dead-letter watch,
replay.

Statement-level with transition tables: the relay flips up to a batch of tasks in one
UPDATE and the consumer finishes a batch in one, and each such statement sends one
notification per ~6 kB of changes instead of one per row. Only rows whose status
changed are sent (old and new joined by id), so heartbeats and lease renewals send
nothing. A NOTIFY is delivered at commit and only then, so a listener never hears of a
change that was rolled back.

Payload: a JSON array of ``[id, status, type, queue]``, enough for the api to match a
waiter by id and a stream by type, queue and status without a query. A payload may not
exceed 8000 bytes or the NOTIFY (and so the writer's transaction) fails: entries are
grouped by their running byte count into chunks of at most 4000 bytes plus one entry.
Type and queue are cut to 200 characters; as JSON a character takes at most 6 bytes (a
control character written as \\u0001), so an entry stays below 2600 bytes and a chunk
below 6600. The channel name is db.task_events.CHANNEL, written out
here because a migration must not change when the code does.

Creating a task sends nothing: a NOTIFY in a transaction holds a cluster-wide lock
through the commit's WAL flush, so notifying transactions cannot share a group commit
(DESIGN.md measured about half the commit rate under concurrent writers). Each create
is its own small transaction on the ingest path, while status changes come in batches
(the relay's flip, the consumer's claim and outcome) and pay it once per batch. A
task's first event is therefore its first status change; a waiter reads the task
itself, so it needs no event for the NEW it starts from.

Transition tables cannot be combined with a column list (``UPDATE OF status``), so the
trigger fires for every UPDATE statement on tasks; the join finds nothing to send for
those that leave the status alone.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
CREATE OR REPLACE FUNCTION public.taskbox_notify_task_events()
RETURNS trigger
LANGUAGE plpgsql
AS $body$
DECLARE
    chunk text;
BEGIN
    FOR chunk IN
        SELECT '[' || string_agg(entry, ',') || ']'
        FROM (
            SELECT entry,
                   sum(octet_length(entry) + 1) OVER (ROWS UNBOUNDED PRECEDING) AS upto
            FROM (
                SELECT json_build_array(
                           n.id, n.status, left(n.type, 200), left(n.queue, 200)
                       )::text AS entry
                FROM taskbox_new_rows n
                JOIN taskbox_old_rows o ON o.id = n.id
                WHERE n.status IS DISTINCT FROM o.status
            ) AS entries
        ) AS counted
        GROUP BY upto / 4000
    LOOP
        PERFORM pg_notify('taskbox_task_events', chunk);
    END LOOP;
    RETURN NULL;
END
$body$
"""
    )
    # Only the triggers run it (Postgres checks no EXECUTE when a trigger fires): no role
    # needs to call it, and the least-privilege roles are granted no function but theirs.
    op.execute("REVOKE ALL ON FUNCTION public.taskbox_notify_task_events() FROM PUBLIC")
    op.execute("DROP TRIGGER IF EXISTS taskbox_task_updated ON public.tasks")
    op.execute(
        """
CREATE TRIGGER taskbox_task_updated
AFTER UPDATE ON public.tasks
REFERENCING OLD TABLE AS taskbox_old_rows NEW TABLE AS taskbox_new_rows
FOR EACH STATEMENT EXECUTE FUNCTION public.taskbox_notify_task_events()
"""
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS taskbox_task_updated ON public.tasks")
    op.execute("DROP FUNCTION IF EXISTS public.taskbox_notify_task_events()")
