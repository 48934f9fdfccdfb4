"""``taskbox tasks cancel|retry``: the bulk actions of ``POST /api/v1/tasks/cancel|retry``
from the command line.

The same implementation (:mod:`db.actions`): the same filter, chunks, audit row in
``task_actions`` (with the operator's user@host as the actor) and outcome. Runs with
DATABASE_URL as the tables' owner, as ``taskbox replay`` does, and prints the action's
progress after each chunk. Exit status: 0 done, 1 failed or unreachable, 2 a
command-line mistake.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import asyncpg

from taskbox.db import actions
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.pool import connect
from taskbox.relay.replay import operator, parse_moment, parse_statuses, parse_task_id, positive
from taskbox.relay.settings import RelaySettings
from taskbox.runtime import tracing
from taskbox.runtime.queues import InvalidQueueName, check_queue_name, check_reason

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Cancel or retry every task a filter selects, in chunks (one short transaction each),
recorded in task_actions with your user@host and the reason, as the API's
POST /api/v1/tasks/cancel and /retry do. cancel: NEW and PENDING tasks become CANCELLED,
PROCESSING ones are asked to stop; retry: the replay of 'taskbox replay' (PENDING and
FAILED tasks, with --force DONE and CANCELLED too, go back to NEW). Tasks created after
the command started are left alone. Look first with --dry-run.

examples:
  taskbox tasks cancel --queue media --status NEW,PENDING --reason "INC-1234" --dry-run
  taskbox tasks retry --status FAILED --type sha256 --created-after 2h --reason "bad deploy"
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, what in (
        ("cancel", "cancel the selected tasks"),
        ("retry", "send the selected tasks through the outbox again (the replay)"),
    ):
        sub = verbs.add_parser(action, help=what, description=DESCRIPTION)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        sub.set_defaults(tasks_parser=sub)  # check_arguments reports through it
        _add_options(sub, retry=action == "retry")


def _add_options(parser: argparse.ArgumentParser, *, retry: bool) -> None:
    chosen = parser.add_argument_group(
        "which tasks (every criterion given must hold; at least one, or --all)"
    )
    chosen.add_argument(
        "--status",
        dest="statuses",
        metavar="STATUS",
        type=parse_statuses,
        action="append",
        default=[],
        help="tasks in this status; repeat or comma-separate",
    )
    chosen.add_argument("--type", help="tasks of this type")
    chosen.add_argument("--queue", type=_queue_name, help="tasks of this queue")
    chosen.add_argument(
        "--created-after",
        metavar="WHEN",
        type=parse_moment,
        help="created after WHEN: a time (2024-05-01T10:00, UTC unless an offset is given) "
        "or a duration ago (2h)",
    )
    chosen.add_argument(
        "--created-before", metavar="WHEN", type=parse_moment, help="created before WHEN"
    )
    chosen.add_argument(
        "--id",
        dest="ids",
        metavar="ID",
        type=parse_task_id,
        action="append",
        default=[],
        help=f"a task id; repeat for several (at most {actions.MAX_IDS})",
    )
    chosen.add_argument(
        "--all", action="store_true", help="every task the other criteria (if any) select"
    )
    how = parser.add_argument_group("how")
    how.add_argument(
        "--reason", required=True, type=_reason, help="why (required); recorded with your user@host"
    )
    how.add_argument(
        "--dry-run",
        action="store_true",
        help="count, and list a sample of, the selected tasks; change nothing",
    )
    if retry:
        how.add_argument("--force", action="store_true", help="retry DONE and CANCELLED tasks too")
    how.add_argument(
        "--chunk-size",
        metavar="N",
        type=positive,
        default=actions.DEFAULT_CHUNK,
        help=f"tasks per transaction (default {actions.DEFAULT_CHUNK}, at most "
        f"{actions.MAX_CHUNK})",
    )


def _queue_name(text: str) -> str:
    try:
        return check_queue_name(text)
    except InvalidQueueName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _reason(text: str) -> str:
    try:
        return check_reason(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def task_filter(args: argparse.Namespace) -> actions.TaskFilter:
    return actions.TaskFilter(
        statuses=tuple(dict.fromkeys(s for group in args.statuses for s in group)),
        type=args.type,
        queue=args.queue,
        created_after=args.created_after,
        created_before=args.created_before,
        ids=tuple(dict.fromkeys(args.ids)),
        everything=args.all,
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Mistakes argparse cannot see alone; exits 2 with what to fix."""
    chosen = task_filter(args)
    if not (chosen.has_criteria() or chosen.everything):
        parser.error(
            "choose which tasks: --status, --type, --queue, --created-after, "
            "--created-before or --id; or --all to act on every task"
        )
    if len(chosen.ids) > actions.MAX_IDS:
        parser.error(f"at most {actions.MAX_IDS} --id; select more tasks by the other criteria")
    after, before = args.created_after, args.created_before
    if after is not None and before is not None and after >= before:
        parser.error("--created-after must be earlier than --created-before")
    if args.chunk_size > actions.MAX_CHUNK:
        parser.error(f"--chunk-size is at most {actions.MAX_CHUNK}")


async def run(
    args: argparse.Namespace,
    settings: RelaySettings,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    request = actions.BulkRequest(
        action=args.action,
        filter=task_filter(args),
        reason=args.reason,
        actor=operator(),
        dry_run=args.dry_run,
        force=getattr(args, "force", False),
        chunk_size=args.chunk_size,
    )
    try:
        conn = await connect(settings)
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        print(f"cannot reach Postgres at DATABASE_URL: {exc}", file=err)
        return EXIT_FAILED

    def progress(action: actions.TaskAction) -> None:
        walked = action.changed + action.skipped
        print(
            f"{action.action} #{action.id}: {walked:,}/{action.matched:,}, "
            f"changed {action.changed:,}, skipped {action.skipped:,}",
            file=err,
            flush=True,
        )

    trace = tracing.new_trace()
    try:
        outcome = await actions.run(
            conn,
            request,
            outbox_channel=settings.outbox_channel,
            headers={tracing.HEADER: str(trace)},
            on_chunk=progress,
        )
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        print(
            f"{args.action} stopped ({type(exc).__name__}: {exc}); the chunks committed "
            "before stay done (see taskbox's task_actions): run it again to continue",
            file=err,
        )
        return EXIT_FAILED
    finally:
        await conn.close()
    done = outcome.action
    if request.dry_run:
        for task in outcome.sample:
            created = f"{task.created_at:%Y-%m-%d %H:%M:%S}"
            print(f"{task.id!s:<36}  {task.type:<20}  {task.status:<10}  {created}", file=out)
        print(
            f"dry run #{done.id}: selected {done.matched:,}, would {args.action} "
            f"{done.changed:,}, would skip {done.skipped:,}",
            file=out,
        )
        return EXIT_OK
    print(
        f"{args.action} #{done.id}: selected {done.matched:,}, changed {done.changed:,}, "
        f"skipped {done.skipped:,}; reason recorded: {done.reason!r} by {done.actor}",
        file=out,
    )
    return EXIT_OK
