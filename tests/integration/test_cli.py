"""``taskbox``, the one command: the installed console script, run as an operator runs it."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ADMIN_DSN, database_dsn
from tests.integration.processes import ROOT, CommandResult, ServiceProcess, run_argv, run_command

# The console script pip installed next to this interpreter (.venv/bin/taskbox).
TASKBOX = str(Path(sys.executable).parent / "taskbox")

SUBCOMMANDS = ["api", "relay", "consumer", "migrate", "replay", "status", "cleanup", "roles"]

# Each subcommand's help is its entry point's own: the same text as the python -m form.
PYTHON_M_FORMS = {
    "api": ("api", []),
    "relay": ("relay", ["run"]),
    "consumer": ("consumer", []),
    "migrate": ("db", ["migrate"]),
    "roles": ("db", ["roles"]),
    "replay": ("relay", ["replay"]),
    "status": ("relay", ["status"]),
    "cleanup": ("relay", ["cleanup"]),
}


async def run_taskbox(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60.0
) -> CommandResult:
    return await run_argv(
        [TASKBOX, *args], env if env is not None else dict(os.environ), timeout=timeout
    )


async def test_help_lists_every_subcommand_with_a_line_each() -> None:
    result = await run_taskbox(["--help"])
    assert result.code == 0, result
    assert result.stdout.startswith("usage: taskbox"), result
    for name in SUBCOMMANDS:
        # argparse's list of subcommands: indented, the name, then what it does
        lines = [line for line in result.stdout.splitlines() if line.startswith(f"    {name} ")]
        assert len(lines) == 1, (name, result.stdout)
        assert len(lines[0].split()) > 2, lines[0]


@pytest.mark.parametrize("name", SUBCOMMANDS)
async def test_each_subcommand_help_is_its_entry_points_own(name: str) -> None:
    result = await run_taskbox([name, "--help"])
    assert result.code == 0, result
    # the usage line names the command as typed, not the python -m form behind it
    assert result.stdout.startswith(f"usage: taskbox {name} "), result
    module, args = PYTHON_M_FORMS[name]
    python_m = await run_command(module, [*args, "--help"], dict(os.environ))
    assert python_m.code == 0, python_m
    assert python_m.stdout.startswith(" ".join(["usage: python -m", f"taskbox.{module}", *args]))
    # the rest (after the usage paragraph, whose wrapping depends on the name) is the same
    assert result.stdout.split("\n\n", 1)[1] == python_m.stdout.split("\n\n", 1)[1]


async def test_unknown_subcommand_exits_2_with_argparses_message() -> None:
    result = await run_taskbox(["frobnicate"])
    assert result.code == 2, result
    assert "usage: taskbox" in result.stderr
    assert "invalid choice: 'frobnicate'" in result.stderr


async def test_no_subcommand_exits_2() -> None:
    result = await run_taskbox([])
    assert result.code == 2, result
    assert "usage: taskbox" in result.stderr


async def test_migrate_creates_the_schema_in_a_fresh_database() -> None:
    name = f"taskbox_cli_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        env = {**os.environ, "DATABASE_URL": database_dsn(name)}
        result = await run_taskbox(["migrate"], env)
        assert result.code == 0, result
        assert "database is at the latest migration" in result.stdout
        conn = await asyncpg.connect(database_dsn(name))
        try:
            tables = {
                row["tablename"]
                for row in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            }
        finally:
            await conn.close()
        assert {"tasks", "outbox", "alembic_version"} <= tables, tables
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_status_prints_the_status_screen(service_env: dict[str, str]) -> None:
    result = await run_taskbox(["status"], service_env)
    assert result.code == 0, result
    assert "tasks         NEW 0  PENDING 0  PROCESSING 0" in result.stdout, result
    assert "outbox        backlog 0 rows" in result.stdout, result


@pytest.mark.parametrize("name", ["relay", "consumer"])
async def test_process_subcommand_stops_on_sigterm_with_exit_0(
    name: str, service_env: dict[str, str]
) -> None:
    process = ServiceProcess(name, service_env, argv=[TASKBOX, name])
    await process.start()
    assert await process.stop() == 0, process.output


DB_PASSWORD = "Db-S3cret-pw"


@pytest.mark.parametrize("name", ["status", "relay", "consumer"])
async def test_invalid_database_url_exits_2_with_the_url_masked(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TASKBOX_FAILPOINTS"}
    env["DATABASE_URL"] = f"mysql://admin:{DB_PASSWORD}@db.internal/taskbox"
    result = await run_taskbox([name], env)
    assert result.code == 2, result
    assert (
        "invalid setting DATABASE_URL='mysql://admin:***@db.internal/taskbox': "
        "DATABASE_URL must start with one of postgresql://" in result.stderr
    ), result
    assert DB_PASSWORD not in result.stdout + result.stderr


async def test_help_loads_no_server_code() -> None:
    server = ("api", "relay", "consumer", "db", "broker", "runtime", "tasktypes")
    prefixes = [("taskbox", name) for name in server]
    script = (
        "import contextlib, io, sys\n"
        "from taskbox.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        f"print(sorted(m for m in sys.modules if tuple(m.split('.')[:2]) in {prefixes!r}))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await proc.communicate()
    assert proc.returncode == 0
    assert stdout.decode().strip() == "[]"
