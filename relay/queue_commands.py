"""``taskbox queues``: list the queues, show one, pause and resume one.

The operator's side of ``/api/v1/queues``: the same queries and the same two database
functions (``pause_queue``, ``resume_queue``), recorded with the operator's user@host
instead of an API key's name. Runs with DATABASE_URL as the tables' owner, as replay
does (the relay's role may list and show, not pause), and never talks to RabbitMQ.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import datetime
from typing import Any

import asyncpg

from taskbox.db import queues
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.relay.replay import operator
from taskbox.relay.settings import RelaySettings
from taskbox.relay.status import queue_line
from taskbox.runtime.queues import InvalidQueueName, check_queue_name, check_reason

EXAMPLES = """examples:
  taskbox queues
  taskbox queues show media
  taskbox queues pause media --reason "image service down, INC-1234"
  taskbox queues resume media --reason "image service back"
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="every queue in use (the default)")
    show = actions.add_parser("show", help="one queue with its latest pauses and resumes")
    show.add_argument("name", type=_queue_name)
    for action, what in (
        ("pause", "its waiting tasks stay NEW and its consumers take no new messages"),
        ("resume", "its parked tasks go out again and its consumers resume"),
    ):
        sub = actions.add_parser(action, help=f"{action} a queue: {what}")
        sub.add_argument("name", type=_queue_name)
        sub.add_argument(
            "--reason",
            required=True,
            type=_reason,
            help="why (required); recorded with your user@host in the queue's events",
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


async def run(args: argparse.Namespace, settings: RelaySettings) -> int:
    try:
        conn = await asyncpg.connect(settings.database_url)
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        print(f"cannot reach Postgres (DATABASE_URL): {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return await _act(conn, args, settings)
    except asyncpg.UndefinedFunctionError:
        print(
            "the database is not migrated for pausing queues: run taskbox migrate", file=sys.stderr
        )
        return EXIT_FAILED
    finally:
        await conn.close()


async def _act(conn: asyncpg.Connection, args: argparse.Namespace, settings: RelaySettings) -> int:
    action = args.action or "list"
    if action == "list":
        found = await queues.list_queues(conn)
        if args.json:
            _print_json({"items": [asdict(q) for q in found]})
        else:
            for q in found:
                print(queue_line(q))
        return EXIT_OK
    known = False
    if action == "pause":
        changed = await queues.pause(conn, args.name, operator(), args.reason)
        known = True
        if not args.json:
            print(f"queue {args.name}: " + ("paused" if changed else "was paused already"))
    elif action == "resume":
        parked = await queues.resume(
            conn, args.name, operator(), args.reason, settings.outbox_channel
        )
        known = parked is not None
        if not args.json:
            print(
                f"queue {args.name}: resumed, {parked:,} parked tasks go out again"
                if parked is not None
                else f"queue {args.name}: was not paused"
            )
    view, history = await queues.describe(conn, args.name, known=known)
    if view is None:
        print(f"no queue {args.name!r} is in use (no tasks, consumers or pause)", file=sys.stderr)
        return EXIT_NOT_FOUND
    if args.json:
        _print_json({**asdict(view), "events": [asdict(e) for e in history]})
        return EXIT_OK
    if action == "show":
        print(queue_line(view))
        for event in history:
            print(
                f"  {event.at:%Y-%m-%d %H:%M:%S} UTC  {event.action:<6} by {event.actor}: "
                f"{event.reason}"
            )
    return EXIT_OK


def _print_json(document: dict[str, Any]) -> None:
    print(json.dumps(document, default=_jsonable, indent=2))


def _jsonable(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON: {type(value).__name__}")
