"""``python -m db``: the database's operator commands.

python -m db migrate   create the database if needed and apply migrations
python -m db roles     create or update the api, relay and consumer roles and their grants
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

import asyncpg
from pydantic import ValidationError

from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.grants import FUNCTIONS, GRANTS, PROCESSES, Process
from taskbox.db.migrations import migrate
from taskbox.db.roles import (
    DEFAULT_NAMES,
    LOCK_TIMEOUT,
    PASSWORD_VARIABLES,
    Plan,
    RolesError,
    apply_roles,
    describe,
)
from taskbox.db.settings import DatabaseSettings

EXIT_ERROR = 2  # nothing was changed; the message says what to fix

ROLES_DESCRIPTION = f"""\
Create (or bring back in line) one LOGIN role per process on the database in
DATABASE_URL, revoke anything else they hold there and grant only what each process
needs. Run it as the database owner with CREATEROLE (or a superuser), after every
'python -m db migrate'; rerunning it is harmless. Passwords are read from
{", ".join(PASSWORD_VARIABLES.values())}; an unset variable leaves that role's
password as it is (a new role then has none).

It changes nothing outside this database, but ends with the REVOKE CONNECT statements
that would keep the roles out of the server's other databases (every database lets
PUBLIC connect unless told otherwise), for the operator to run.
"""


def build_parser(command_prog: str | None = None) -> argparse.ArgumentParser:
    """``command_prog`` names the command in each subcommand's usage line (``taskbox
    migrate``) for callers that run one subcommand under a name of their own."""
    parser = argparse.ArgumentParser(
        prog="python -m taskbox.db",
        description="The database's operator commands.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "migrate", prog=command_prog, help="create the database if missing and apply migrations"
    )
    roles = commands.add_parser(
        "roles",
        prog=command_prog,
        help="create or update the least-privilege roles of api, relay and consumer",
        description=ROLES_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for process in PROCESSES:
        roles.add_argument(
            f"--{process}-role",
            default=DEFAULT_NAMES[process],
            metavar="NAME",
            help=f"the {process}'s role (default {DEFAULT_NAMES[process]})",
        )
    roles.add_argument(
        "--dry-run", action="store_true", help="print the statements; change nothing"
    )
    return parser


def _print_connect_advice(plan: Plan, out: TextIO, prefix: str) -> None:
    """Why and how to keep the roles out of other databases; run by the operator."""
    if not plan.connect_advice:
        return
    lines = [
        "CONNECT: PUBLIC may connect to a database unless that is revoked, so these roles",
        "can log in to other databases on this server too and use there whatever PUBLIC",
        "may (temporary tables, functions, what is granted to PUBLIC, every catalogue):",
        "a leaked password would reach beyond Taskbox. As each database's owner, run",
        *(f"    {statement};" for statement in plan.connect_advice),
        f"after granting CONNECT to every other role that still needs it (in {plan.database}",
        "the three roles have their own; python -m db migrate connects to postgres when it",
        "must create the database). New databases let PUBLIC connect again.",
    ]
    for line in lines:
        print(f"{prefix}{line}", file=out)


def _print_report(plan: Plan, dry_run: bool, out: TextIO) -> None:
    if dry_run:
        for step in plan.steps:
            print(f"{step.shown};", file=out)
        print(f"-- dry run: nothing was changed in database {plan.database}", file=out)
        _print_connect_advice(plan, out, "-- ")
        return
    for outcome in plan.outcomes:
        state = "created" if outcome.created else "updated"
        password = (
            f"password set from {PASSWORD_VARIABLES[outcome.process]}"
            if outcome.password_set
            else "password unchanged"
        )
        print(f"{outcome.role} ({outcome.process}): {state}, {password}", file=out)
        for grant in GRANTS[outcome.process]:
            print(f"    {describe(grant, plan.sequence)}", file=out)
        for function in FUNCTIONS[outcome.process]:
            print(f"    function {function}: EXECUTE", file=out)
    for what in plan.public_revoked:
        print(f"revoked from PUBLIC: {what}", file=out)
    print(
        f"grants applied in database {plan.database}; point each process's DATABASE_URL at "
        "its role, and rerun this after every migration",
        file=out,
    )
    _print_connect_advice(plan, out, "")


async def _roles(
    settings: DatabaseSettings,
    names: Mapping[Process, str],
    dry_run: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    passwords = {p: os.environ.get(PASSWORD_VARIABLES[p]) for p in PROCESSES}
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=settings.db_connect_timeout)
    except asyncpg.InvalidCatalogNameError as exc:
        print(f"{exc}: run python -m db migrate first", file=err)
        return EXIT_ERROR
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        print(f"cannot reach Postgres at DATABASE_URL: {exc}", file=err)
        return EXIT_ERROR
    try:
        plan = await apply_roles(conn, names, passwords, dry_run=dry_run)
    except RolesError as exc:
        print(str(exc), file=err)
        return EXIT_ERROR
    except asyncpg.LockNotAvailableError:
        print(
            f"a table stayed locked for {LOCK_TIMEOUT} (a long transaction?) while a policy "
            "had to change; nothing was changed, run this again",
            file=err,
        )
        return EXIT_ERROR
    except asyncpg.InsufficientPrivilegeError as exc:
        # The checks passed but Postgres still refused, e.g. a role we may not alter.
        print(f"must run as the database owner with CREATEROLE: {exc}", file=err)
        return EXIT_ERROR
    except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
        print(
            f"applying the roles failed, nothing was changed ({type(exc).__name__}: {exc})",
            file=err,
        )
        return EXIT_ERROR
    finally:
        await conn.close()
    _print_report(plan, dry_run, out)
    return 0


def main(argv: list[str] | None = None, command_prog: str | None = None) -> int:
    args = build_parser(command_prog).parse_args(argv)
    try:
        settings = DatabaseSettings()
    except ValidationError as exc:
        # The setting and the reason, never the value: a rejected DATABASE_URL may hold
        # a password (the processes show it masked, runtime.settings.describe_invalid).
        for error in exc.errors(include_url=False):
            name = ".".join(str(part) for part in error["loc"]).upper() or "settings"
            message = error["msg"].removeprefix("Value error, ")
            print(f"invalid setting {name}: {message}", file=sys.stderr)
        return EXIT_ERROR
    if args.command == "roles":
        names: dict[Process, str] = {p: getattr(args, f"{p}_role") for p in PROCESSES}
        return asyncio.run(_roles(settings, names, args.dry_run, sys.stdout, sys.stderr))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        migrate(settings)
    except OSError as exc:
        print(f"cannot reach Postgres at DATABASE_URL: {exc}", file=sys.stderr)
        return 2
    print("database is at the latest migration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
