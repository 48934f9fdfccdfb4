"""``python -m relay replay``: send tasks through the outbox again, by hand.

For when something downstream lost messages: a purged or deleted queue, a broker that
lost its disk. The operator selects tasks (ids, an outbox id range, status, type,
creation time, or "PENDING for longer than X"), looks at ``--dry-run``, then replays
with a ``--reason``. Each chunk of tasks is one transaction (new ``task.replay`` outbox
rows, tasks back to NEW; see :mod:`db.replay`), followed by a NOTIFY that wakes the
relays. Exit status: 0 when every selected task was (or, with --dry-run, would be)
replayed, 1 when some were refused or the run failed, 2 for a command-line mistake.
"""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TextIO

import asyncpg

from taskbox.db import outbox
from taskbox.db import replay as store
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.pool import connect
from taskbox.db.states import TaskStatus
from taskbox.relay.settings import RelaySettings
from taskbox.runtime import tracing
from taskbox.runtime.durations import InvalidDuration, format_duration, parse_duration

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Send tasks through the outbox again: for each selected task, in one transaction per
chunk, a new task.replay outbox row and the task back to NEW; the relays publish it.
PENDING and FAILED tasks are replayed, DONE and CANCELLED ones only with --force,
PROCESSING ones never. Look first with --dry-run.

exit status: 0 every selected task was (with --dry-run: would be) replayed,
             1 some were refused or the run failed, 2 a command-line mistake

example: taskbox replay --stale-for 10m --reason "queue purged, INC-1234"
"""
DEFAULT_CHUNK = 500
_LISTED_REFUSALS = 50  # refused tasks listed one per line; the rest are only counted

# Why a task in this status is not replayed (with --force where that would help).
_REFUSAL = {
    TaskStatus.NEW: "already waiting for the relay to publish it",
    TaskStatus.PROCESSING: "a consumer runs it now; never replayed",
    TaskStatus.DONE: "finished; pass --force to run it again",
    TaskStatus.CANCELLED: "cancelled; pass --force to run it again",
}


def refusal(status: TaskStatus) -> str:
    return _REFUSAL.get(status, "cannot be replayed")


# -- parsing the command line ------------------------------------------------------------


def parse_outbox_range(text: str) -> tuple[int, int]:
    """``FROM..TO`` (inclusive), ``FROM..``, ``..TO`` or a single id."""
    hint = f"--outbox-id wants FROM..TO (e.g. 1200..1350), FROM.., ..TO or one id; got {text!r}"
    if text.strip() in ("", ".."):
        raise argparse.ArgumentTypeError(hint)
    low_text, dots, high_text = text.strip().partition("..")
    if not dots:
        high_text = low_text
    try:
        low = int(low_text) if low_text.strip() else 1
        high = int(high_text) if high_text.strip() else 2**63 - 1
    except ValueError:
        raise argparse.ArgumentTypeError(hint) from None
    if low < 1 or high < 1:
        raise argparse.ArgumentTypeError(f"{hint}: outbox ids start at 1")
    if low > high:
        raise argparse.ArgumentTypeError(f"{hint}: FROM is above TO; swap them")
    return low, high


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (no offset: UTC) or a duration ago (``2h``: two hours ago)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            ago = parse_duration(text)
        except InvalidDuration:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a time (2024-05-01, 2024-05-01T10:30, "
                "2024-05-01T10:30+02:00; no offset means UTC) nor a duration ago (30m, 2h, 3d)"
            ) from None
        return (now or datetime.now(UTC)) - timedelta(seconds=ago)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_statuses(text: str) -> list[TaskStatus]:
    """One status or a comma-separated list, any case."""
    statuses = []
    for name in filter(None, (part.strip().upper() for part in text.split(","))):
        try:
            statuses.append(TaskStatus(name))
        except ValueError:
            known = ", ".join(s.value for s in TaskStatus)
            raise argparse.ArgumentTypeError(
                f"{name!r} is not a task status; one of {known}"
            ) from None
    if not statuses:
        raise argparse.ArgumentTypeError("--status needs a status, e.g. PENDING or FAILED,DONE")
    return statuses


def parse_task_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a task id (a UUID)") from None


def parse_stale_for(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except InvalidDuration as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("--stale-for must be longer than 0, e.g. 10m")
    return seconds


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"want a whole number of at least 1; got {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(replay_parser=parser)  # check_arguments reports through it
    chosen = parser.add_argument_group(
        "which tasks (every criterion given must hold; at least one is required)"
    )
    chosen.add_argument(
        "--task-id",
        dest="task_ids",
        metavar="ID",
        type=parse_task_id,
        action="append",
        default=[],
        help="a task id; repeat for several",
    )
    chosen.add_argument(
        "--outbox-id",
        metavar="FROM..TO",
        type=parse_outbox_range,
        help="tasks with an outbox row in this id range (inclusive; FROM.. and ..TO too)",
    )
    chosen.add_argument(
        "--status",
        dest="statuses",
        metavar="STATUS",
        type=parse_statuses,
        action="append",
        default=[],
        help="tasks in this status (PENDING, FAILED, ...); repeat or comma-separate",
    )
    chosen.add_argument("--type", help="tasks of this type")
    chosen.add_argument(
        "--since",
        metavar="WHEN",
        type=parse_moment,
        help="created at or after WHEN: a time (2024-05-01T10:00, UTC unless an offset is "
        "given) or a duration ago (2h)",
    )
    chosen.add_argument("--until", metavar="WHEN", type=parse_moment, help="created before WHEN")
    chosen.add_argument(
        "--stale-for",
        metavar="DURATION",
        type=parse_stale_for,
        help="PENDING for longer than DURATION (10m, 1h): published, but no consumer ever "
        "got it, so the broker lost it",
    )
    chosen.add_argument("--limit", metavar="N", type=positive, help="at most N tasks, oldest first")
    how = parser.add_argument_group("how")
    how.add_argument(
        "--dry-run", action="store_true", help="print what would be replayed; change nothing"
    )
    how.add_argument(
        "--reason",
        metavar="TEXT",
        help="why you replay (required unless --dry-run); recorded with who and "
        "when in each new outbox row's headers",
    )
    how.add_argument(
        "--force",
        action="store_true",
        help="replay DONE and CANCELLED tasks too (never PROCESSING)",
    )
    how.add_argument(
        "--chunk-size",
        metavar="N",
        type=positive,
        default=DEFAULT_CHUNK,
        help=f"tasks per transaction (default {DEFAULT_CHUNK})",
    )


def selection_of(args: argparse.Namespace) -> store.Selection:
    return store.Selection(
        task_ids=list(dict.fromkeys(args.task_ids)),
        outbox_ids=args.outbox_id,
        statuses=list(dict.fromkeys(s for group in args.statuses for s in group)),
        type=args.type,
        created_since=args.since,
        created_until=args.until,
        stale_for=args.stale_for,
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Mistakes argparse cannot see alone; exits 2 with what to fix."""
    if selection_of(args).is_empty():
        parser.error(
            "choose what to replay: --task-id, --outbox-id, --status, --type, --since, "
            "--until or --stale-for (replaying every task is never what you want)"
        )
    if not args.dry_run and not (args.reason and args.reason.strip()):
        parser.error(
            '--reason "TEXT" is required: say why you replay; it is recorded in the outbox '
            "(or look first with --dry-run)"
        )
    if args.since is not None and args.until is not None and args.since >= args.until:
        parser.error("--since must be earlier than --until")


# -- running it --------------------------------------------------------------------------


def operator() -> str:
    """Who runs the replay, for the audit headers: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class Tally:
    selected: int = 0
    replayed: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    refused_ids: list[tuple[uuid.UUID, str]] = field(default_factory=list)

    def refuse(self, task_id: uuid.UUID, why: str) -> None:
        self.refused[why] += 1
        self.refused_ids.append((task_id, why))


def _table_row(task_id: object, type_: str, status: str, age: str, action: str) -> str:
    return f"{task_id!s:<36}  {type_:<20}  {status:<10}  {age:>7}  {action}"


class Replay:
    def __init__(
        self, args: argparse.Namespace, settings: RelaySettings, out: TextIO, err: TextIO
    ) -> None:
        self._args = args
        self._settings = settings
        self._selection = selection_of(args)
        self._force: bool = args.force
        self._out = out
        self._err = err
        self.tally = Tally()
        self.trace = tracing.new_trace()
        self.headers = {
            "who": operator(),
            "why": (args.reason or "").strip(),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            tracing.HEADER: str(self.trace),
        }

    def _print(self, line: str = "") -> None:
        print(line, file=self._out)

    async def run(self, conn: asyncpg.Connection) -> None:
        total = await store.count_selected(conn, self._selection)
        if self._args.limit is not None:
            total = min(total, self._args.limit)
        if self._selection.task_ids:
            for task_id in await store.missing_task_ids(conn, self._selection.task_ids):
                self.tally.selected += 1
                self.tally.refuse(task_id, "no such task")
        if self._args.dry_run:
            self._print(_table_row("TASK ID", "TYPE", "STATUS", "AGE", "REPLAY?"))
        remaining = total
        after: tuple[datetime, uuid.UUID] | None = None
        while remaining > 0:
            page = await store.select_page(
                conn, self._selection, min(self._args.chunk_size, remaining), after
            )
            if not page:
                break
            remaining -= len(page)
            after = (page[-1]["created_at"], page[-1]["id"])
            await self._chunk(conn, page)
            if total > self._args.chunk_size and not self._args.dry_run:
                done = self.tally.selected - self._missing()
                refused = sum(self.tally.refused.values())
                print(
                    f"replay: {done:,}/{total:,} ({100 * done // max(total, 1)}%), "
                    f"replayed {self.tally.replayed:,}, refused {refused:,}",
                    file=self._err,
                    flush=True,
                )

    def _missing(self) -> int:
        return self.tally.refused["no such task"]

    async def _chunk(self, conn: asyncpg.Connection, page: list[asyncpg.Record]) -> None:
        allowed = store.replayable(self._force)
        self.tally.selected += len(page)
        send = []
        for row in page:
            status = TaskStatus(row["status"])
            if status in allowed:
                send.append(row["id"])
            else:
                self.tally.refuse(row["id"], f"{status}: {refusal(status)}")
            if self._args.dry_run:
                action = "yes" if status in allowed else f"no, {refusal(status)}"
                self._print(
                    _table_row(
                        row["id"], row["type"], row["status"], format_duration(row["age"]), action
                    )
                )
        if self._args.dry_run or not send:
            return
        result = await store.replay_chunk(conn, send, self.headers, force=self._force)
        self.tally.replayed += len(result.replayed)
        for task_id, now in result.refused.items():
            self.tally.refuse(
                task_id, "gone meanwhile" if now is None else f"changed to {now} meanwhile"
            )
        # Committed: wake the relays now rather than at their next poll.
        await outbox.notify(conn, self._settings.outbox_channel)

    def summary(self) -> None:
        tally = self.tally
        refused = sum(tally.refused.values())
        verb = "would replay" if self._args.dry_run else "replayed"
        replayed = tally.selected - refused if self._args.dry_run else tally.replayed
        self._print()
        self._print(f"selected {tally.selected:,}, {verb} {replayed:,}, refused {refused:,}")
        for why, count in tally.refused.most_common():
            self._print(f"  refused {count:,} — {why}")
        if refused and not self._args.dry_run:
            for task_id, why in tally.refused_ids[:_LISTED_REFUSALS]:
                self._print(f"  {task_id}  {why}")
            if refused > _LISTED_REFUSALS:
                self._print(f"  ... and {refused - _LISTED_REFUSALS:,} more")
        if replayed and not self._args.dry_run:
            self._print(
                f"reason recorded: {self.headers['why']!r} by {self.headers['who']}; "
                f"trace id {self.trace.trace_id}"
            )

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.tally.refused else EXIT_OK


async def replay(
    args: argparse.Namespace,
    settings: RelaySettings,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    try:
        conn = await connect(settings)
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        print(f"cannot reach Postgres at DATABASE_URL: {exc}", file=err)
        return EXIT_FAILED
    job = Replay(args, settings, out, err)
    try:
        await job.run(conn)
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        job.summary()
        print(
            f"replay stopped ({type(exc).__name__}: {exc}); the chunks committed before "
            "stay replayed: run the same command again to continue",
            file=err,
        )
        return EXIT_FAILED
    finally:
        await conn.close()
    job.summary()
    return job.exit_code
