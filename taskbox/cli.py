"""``taskbox``: one command over Taskbox's processes and operator commands.

Each subcommand hands the arguments after its name, untouched, to the entry point its
``python -m`` form runs (``taskbox replay --stale-for 10m`` is ``python -m taskbox.relay
replay --stale-for 10m``): the options, the ``--help`` and the exit status (2 for a bad
setting, 3 for a dead background loop) are that entry point's; only the usage line
names the command as typed (``usage: taskbox replay ...``). A process package is imported only
once its subcommand is chosen, so ``taskbox --help`` loads no server code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass


def _api(args: list[str], prog: str) -> int:
    from taskbox.api.__main__ import main

    return main(args, prog)


def _relay(args: list[str], prog: str) -> int:
    from taskbox.relay.__main__ import main

    return main(args, prog)


def _consumer(args: list[str], prog: str) -> int:
    from taskbox.consumer.__main__ import main

    return main(args, prog)


def _db(args: list[str], prog: str) -> int:
    from taskbox.db.__main__ import main

    return main(args, prog)


@dataclass(frozen=True)
class Subcommand:
    entry_point: Callable[[list[str], str], int]  # (arguments, the usage line's name)
    command: tuple[str, ...]  # the entry point's own subcommand, put before the user's args
    summary: str  # one line in ``taskbox --help``


SUBCOMMANDS = {
    "api": Subcommand(_api, (), "serve the REST API on API_HOST:API_PORT"),
    "relay": Subcommand(_relay, ("run",), "run one outbox relay until SIGTERM/SIGINT"),
    "consumer": Subcommand(_consumer, (), "run one consumer until SIGTERM/SIGINT"),
    "migrate": Subcommand(
        _db,
        ("migrate",),
        "create the database if missing, apply migrations",
    ),
    "replay": Subcommand(_relay, ("replay",), "send tasks through the outbox again"),
    "status": Subcommand(
        _relay,
        ("status",),
        "one screen: tasks, outbox backlog and lag, queues",
    ),
    "cleanup": Subcommand(_relay, ("cleanup",), "one retention sweep now"),
    "queues": Subcommand(_relay, ("queues",), "list, show, pause and resume queues"),
    "tasks": Subcommand(_relay, ("tasks",), "cancel or retry every task a filter selects, audited"),
    "schedules": Subcommand(
        _relay,
        ("schedules",),
        "periodic tasks: list, show, pause, resume, run now, delete",
    ),
    "roles": Subcommand(
        _db,
        ("roles",),
        "least-privilege roles for api, relay, consumer",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskbox",
        description="Taskbox's processes and operator commands. Settings come from the "
        "environment and .env (see README, Configuration).",
        epilog="'taskbox COMMAND --help' shows the options of COMMAND. Each command is "
        "also 'python -m taskbox.api|relay|consumer', 'python -m taskbox.db migrate|roles' "
        "and 'python -m taskbox.relay replay|status|cleanup|queues|tasks|schedules'.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, subcommand in SUBCOMMANDS.items():
        # No options here: everything after the name belongs to the entry point.
        commands.add_parser(name, help=subcommand.summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not args or args[0].startswith("-"):
        parser.parse_args(args)  # --help, or argparse's usage error (exit 2)
        return 2  # unreachable: there is no option that lets parsing go on
    # The name alone goes through argparse (an unknown one is its exit 2); the rest is
    # passed on as typed, '--' and all, for the entry point's own parser.
    name = parser.parse_args(args[:1]).command
    subcommand = SUBCOMMANDS[name]
    return subcommand.entry_point([*subcommand.command, *args[1:]], f"taskbox {name}")


if __name__ == "__main__":
    sys.exit(main())
