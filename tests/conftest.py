"""Fixtures shared by every test.

Integration tests get their own database, copied from a template that was migrated
once per session with the real ``python -m db migrate``, and their own exchange and
queue names; both are removed afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import asyncpg
import pytest

from taskbox.broker.settings import BrokerSettings
from taskbox.db.pool import create_pool
from taskbox.db.settings import DatabaseSettings, plain_dsn

ROOT = Path(__file__).resolve().parent.parent

ADMIN_DSN = plain_dsn(
    os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
)
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def database_dsn(name: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + name


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.nodeid.split("/")
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        if parts[:2] == ["tests", "cluster"]:
            # Its own RabbitMQ cluster, 2 to 6 minutes: `make test-cluster` (and
            # `make test-faults`) run it; plain `pytest` leaves it out (addopts -m).
            item.add_marker(pytest.mark.cluster)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def template_database() -> AsyncIterator[str]:
    """A database migrated once per session, to be copied by each test."""
    name = f"taskbox_tpl_{os.getpid()}"
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await _admin(f'CREATE DATABASE "{name}"')
    env = {**os.environ, "DATABASE_URL": database_dsn(name)}
    migrated = subprocess.run(  # noqa: ASYNC221 - once per session, before any test
        [sys.executable, "-m", "db", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert migrated.returncode == 0, migrated.stderr
    yield name
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(template_database: str) -> AsyncIterator[str]:
    name = f"taskbox_test_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield database_dsn(name)
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_settings(database_url: str) -> DatabaseSettings:
    return DatabaseSettings(
        database_url=database_url, outbox_channel=f"outbox_{uuid.uuid4().hex[:10]}"
    )


@pytest.fixture
async def pool(db_settings: DatabaseSettings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(db_settings)
    yield pool
    await pool.close()


@pytest.fixture
async def broker_settings() -> AsyncIterator[BrokerSettings]:
    """Exchange and queue names of this test alone; deleted afterwards."""
    prefix = f"test.{uuid.uuid4().hex[:10]}"
    settings = BrokerSettings(
        amqp_url=AMQP_URL,
        exchange_name=f"{prefix}.tasks",
        queue_name=f"{prefix}.tasks",
        dead_letter_exchange=f"{prefix}.dlx",
        dead_letter_queue=f"{prefix}.dead",
    )
    yield settings
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (
            settings.queue_name,
            settings.dead_letter_queue,
            settings.dead_letter_watch_queue,
        ):
            await channel.queue_delete(queue)
        for exchange in (settings.exchange_name, settings.dead_letter_exchange):
            await channel.exchange_delete(exchange)


@pytest.fixture
def service_env(db_settings: DatabaseSettings, broker_settings: BrokerSettings) -> dict[str, str]:
    """Environment for api/relay/consumer processes started by a test."""
    # Not the OTEL_* of whoever runs the tests: a test that traces says where to.
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "TASKBOX_FAILPOINTS" and not k.startswith("OTEL_")
    }
    env.update(
        {
            "DATABASE_URL": db_settings.database_url,
            "OUTBOX_CHANNEL": db_settings.outbox_channel,
            "AMQP_URL": broker_settings.amqp_url,
            "EXCHANGE_NAME": broker_settings.exchange_name,
            "QUEUE_NAME": broker_settings.queue_name,
            "DEAD_LETTER_EXCHANGE": broker_settings.dead_letter_exchange,
            "DEAD_LETTER_QUEUE": broker_settings.dead_letter_queue,
            "PYTHONUNBUFFERED": "1",
            # Tests start several relays and consumers at once: no fixed metrics ports.
            # A test that wants one passes a free port.
            "RELAY_METRICS_PORT": "0",
            "CONSUMER_METRICS_PORT": "0",
        }
    )
    return env
