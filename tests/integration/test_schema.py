"""The migrations create exactly db/schema.py, re-run as no-ops and downgrade cleanly."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import asyncpg
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import pool as sa_pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from taskbox.db.migrations import alembic_config
from taskbox.db.schema import metadata
from taskbox.db.settings import DatabaseSettings
from tests.conftest import ROOT, database_dsn


def _compare(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    diffs: list[Any] = compare_metadata(context, metadata)
    return diffs


ALL_TABLES = {
    "tasks",
    "outbox",
    "queue_consumers",
    "queue_pauses",
    "queue_events",
    "schedules",
    "webhooks",
    "webhook_deliveries",
    "webhook_attempts",
    "task_actions",
    "alembic_version",
}


async def schema_differences(dsn: str) -> list[Any]:
    """What alembic's autogenerate would change to make the database match the metadata."""
    url = DatabaseSettings(database_url=dsn).sqlalchemy_url
    engine = create_async_engine(url, poolclass=sa_pool.NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_compare)
    finally:
        await engine.dispose()


def head_revision(settings: DatabaseSettings) -> str:
    head = ScriptDirectory.from_config(alembic_config(settings)).get_current_head()
    assert head is not None
    return head


async def tables(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {row["tablename"] for row in rows}


async def versions(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()
    return [row["version_num"] for row in rows]


async def test_migrated_template_matches_the_metadata_exactly(template_database: str) -> None:
    dsn = database_dsn(template_database)

    assert await schema_differences(dsn) == []
    assert await tables(dsn) == ALL_TABLES
    assert await versions(dsn) == [head_revision(DatabaseSettings(database_url=dsn))]


async def test_the_comparison_sees_a_drift(database_url: str) -> None:
    # The check above would be worthless if the comparison could not see anything.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE tasks ADD COLUMN stray integer")
        await conn.execute("ALTER TABLE outbox ALTER COLUMN last_error SET NOT NULL")
        await conn.execute("DROP INDEX ix_outbox_task_id")
    finally:
        await conn.close()

    differences = await schema_differences(database_url)

    found = {diff[0] if isinstance(diff, tuple) else diff[0][0] for diff in differences}
    assert {"remove_column", "modify_nullable", "add_index"} <= found, differences


async def test_migrate_again_is_a_no_op_that_exits_0(database_url: str) -> None:
    # database_url is a copy of the template, which `python -m db migrate` already migrated.
    settings = DatabaseSettings(database_url=database_url)
    conn = await asyncpg.connect(database_url)
    try:
        kept = await conn.fetchval(
            "INSERT INTO tasks (type, payload) VALUES ('echo', '{\"k\": 1}') RETURNING id"
        )
    finally:
        await conn.close()
    env = {k: v for k, v in os.environ.items() if k != "TASKBOX_FAILPOINTS"}
    env["DATABASE_URL"] = database_url

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "db",
        "migrate",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    stdout, stderr = out.decode(), err.decode()

    assert proc.returncode == 0, stderr
    assert "database is at the latest migration" in stdout
    assert "Running upgrade" not in stderr, stderr
    assert await versions(database_url) == [head_revision(settings)]
    assert await schema_differences(database_url) == []
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM tasks WHERE id = $1", kept) == 1
    finally:
        await conn.close()


async def test_downgrade_to_base_then_upgrade_to_head(database_url: str) -> None:
    settings = DatabaseSettings(database_url=database_url)
    config = alembic_config(settings)
    head = head_revision(settings)

    # alembic's env.py calls asyncio.run: it must run outside this event loop.
    await asyncio.to_thread(command.downgrade, config, "base")

    assert await tables(database_url) == {"alembic_version"}
    assert await versions(database_url) == []

    await asyncio.to_thread(command.upgrade, config, "head")

    assert await tables(database_url) == ALL_TABLES
    assert await versions(database_url) == [head]
    assert await schema_differences(database_url) == []
    conn = await asyncpg.connect(database_url)
    try:
        task_id = await conn.fetchval(
            "INSERT INTO tasks (type, payload) VALUES ('echo', '{}') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO outbox (task_id, kind, body) VALUES ($1, 'task.created', '{}')",
            task_id,
        )
        row = await conn.fetchrow("SELECT status, priority, max_attempts FROM tasks")
    finally:
        await conn.close()
    assert row is not None
    assert tuple(row) == ("NEW", 0, 3)


async def test_0002_runs_again_after_a_failed_concurrent_index_build(
    database_url: str,
) -> None:
    settings = DatabaseSettings(database_url=database_url)
    config = alembic_config(settings)
    await asyncio.to_thread(command.downgrade, config, "0001")
    # What a concurrent build that failed halfway leaves: the column committed, the new
    # index there but invalid, the version still 0001.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE tasks ADD COLUMN run_at timestamptz")
        await conn.execute(
            "CREATE INDEX ix_outbox_due ON outbox (available_at, id) WHERE published_at IS NULL"
        )
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ix_outbox_due'::regclass"
        )
    finally:
        await conn.close()

    await asyncio.to_thread(command.upgrade, config, "head")

    assert await versions(database_url) == [head_revision(settings)]
    assert await schema_differences(database_url) == []
    conn = await asyncpg.connect(database_url)
    try:
        valid = await conn.fetchval(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_outbox_due'::regclass"
        )
        old = await conn.fetchval("SELECT to_regclass('ix_outbox_unpublished')")
    finally:
        await conn.close()
    # Postgres refuses CREATE/DROP INDEX CONCURRENTLY inside a transaction block, so this
    # upgrade succeeding also shows the migration left its transaction for the build.
    assert (valid, old) == (True, None)
