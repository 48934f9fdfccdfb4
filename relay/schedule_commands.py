"""``taskbox schedules``: the operator's view of periodic tasks, straight from Postgres.

list, show, create, pause, resume, run (now) and delete. ``create`` checks the task
against the task types of TASK_MODULES (and BUILTIN_TASK_TYPES), as the relay checks a
code schedule; changing a schedule's other fields is ``PATCH /api/v1/schedules/{name}``
(README, "Periodic tasks"). Code schedules are read-only here too.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import UTC, datetime
from typing import TextIO

import asyncpg
import orjson

from taskbox.db import schedules
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.pool import connect
from taskbox.db.schedules import ScheduleDefinition
from taskbox.relay.scheduler import definition_of
from taskbox.relay.settings import RelaySettings
from taskbox.schedules.timing import cron, every, next_fire_times, timing_of
from taskbox.tasktypes import Periodic, load_registry

EXIT_NOT_FOUND = 1
EXIT_REFUSED = 2
EXIT_UNREACHABLE = 3

ACTIONS = ("list", "show", "create", "pause", "resume", "run", "delete")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    parser.add_argument("name", nargs="?", help="the schedule (all but list)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    made = parser.add_argument_group("create")
    made.add_argument("--type", dest="task_type", help="the task type of every tick")
    made.add_argument("--payload", default="{}", help="the payload, a JSON object")
    made.add_argument("--cron", help="a five-field cron line, e.g. '0 6 * * 1-5'")
    made.add_argument("--every", type=float, help="instead of --cron: every this many seconds")
    made.add_argument("--timezone", default="UTC", help="IANA zone of the cron line")
    made.add_argument("--priority", type=int, default=0)
    made.add_argument("--queue", help="the type's own when absent")
    made.add_argument("--max-attempts", type=int)
    made.add_argument("--catch-up", choices=("skip", "all"), default="skip")
    made.add_argument("--paused", action="store_true", help="create it paused")
    parser.set_defaults(schedules_parser=parser)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.action != "list" and not args.name:
        parser.error(f"{args.action} needs the schedule's name")
    if args.action == "create":
        if not args.task_type:
            parser.error("create needs --type")
        if (args.cron is None) == (args.every is None):
            parser.error("create needs exactly one of --cron and --every")


def _create_definition(args: argparse.Namespace, settings: RelaySettings) -> ScheduleDefinition:
    """The schedule ``create`` asks for, checked; ValueError says what is wrong."""
    try:
        payload = orjson.loads(args.payload)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"--payload is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ValueError("--payload must be a JSON object")
    timing = cron(args.cron, args.timezone) if args.cron is not None else every(args.every)
    wanted = Periodic(
        args.name,
        args.task_type,
        timing,
        payload,
        args.priority,
        args.queue,
        args.max_attempts,
        args.catch_up,
    )
    registry = load_registry(settings.task_modules, builtin_types=settings.builtin_task_types)
    definition = definition_of(wanted, registry, settings.default_max_attempts)
    paused: ScheduleDefinition = replace(definition, paused=args.paused)
    return paused


def _dump(value: object, out: TextIO) -> None:
    out.write(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


async def run(args: argparse.Namespace, settings: RelaySettings, out: TextIO = sys.stdout) -> int:
    try:
        conn = await connect(settings)
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        print(f"postgres unreachable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        return await _act(conn, args, settings, out)
    finally:
        await conn.close()


async def _act(
    conn: asyncpg.Connection, args: argparse.Namespace, settings: RelaySettings, out: TextIO
) -> int:
    if args.action == "list":
        found = await schedules.summaries(conn)
        if args.json:
            _dump([vars_of(s) for s in found], out)
        for s in [] if args.json else found:
            state = "PAUSED" if s.paused else f"next {s.next_fire_at:%Y-%m-%d %H:%M:%S} UTC"
            out.write(f"{s.name}  {s.task_type}  {s.timing}  {state}  [{s.source}]\n")
        return 0
    if args.action == "create":
        try:
            definition = _create_definition(args, settings)
        except (ValueError, RuntimeError) as exc:
            print(f"schedule {args.name!r} not created: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        made = await schedules.create_schedule(conn, definition, datetime.now(UTC))
        if made is None:
            print(f"a schedule named {args.name!r} exists already", file=sys.stderr)
            return EXIT_NOT_FOUND
        out.write(
            f"created schedule {args.name!r}: next {made['next_fire_at']:%Y-%m-%d %H:%M:%S} UTC\n"
        )
        return 0
    row = await schedules.get_schedule(conn, args.name)
    if row is None:
        print(f"no schedule named {args.name!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.action == "show":
        timing = timing_of(row["cron"], row["interval_seconds"], row["timezone"])
        document = dict(row)
        document["next_fire_times"] = next_fire_times(timing, row["next_fire_at"], 5)
        document["last_ticks"] = [
            dict(t) for t in await schedules.recent_ticks(conn, args.name, 10)
        ]
        _dump(document, out)
        return 0
    if args.action == "run":
        task = await schedules.run_now(conn, row)
        out.write(f"created task {task['id']} of schedule {args.name!r}\n")
        return 0
    if row["source"] == "code":
        print(
            f"schedule {args.name!r} is declared in code: change it there and deploy",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    if args.action == "delete":
        await schedules.delete_schedule(conn, args.name)
        out.write(f"deleted schedule {args.name!r}; the tasks it created stay\n")
        return 0
    paused = args.action == "pause"
    changed = await schedules.set_paused(conn, args.name, paused)
    assert changed is not None
    late = datetime.now(UTC) >= changed["next_fire_at"]
    more = (
        f" (ticks missed meanwhile: catch_up={changed['catch_up']})" if late and not paused else ""
    )
    out.write(f"schedule {args.name!r} {'paused' if paused else 'resumed'}{more}\n")
    return 0


def vars_of(summary: schedules.ScheduleSummary) -> dict[str, object]:
    return {
        "name": summary.name,
        "source": summary.source,
        "task_type": summary.task_type,
        "timing": summary.timing,
        "paused": summary.paused,
        "next_fire_at": summary.next_fire_at.isoformat(),
    }
