"""Fixtures of the API integration tests: the real app, in-process, over the real Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from taskbox.api.app import create_app
from taskbox.api.settings import ApiSettings
from taskbox.db.settings import DatabaseSettings
from tests.integration.processes import ServiceProcess, free_port


async def poll_until_done(
    client: httpx.AsyncClient, location: str, within: float = 10.0
) -> dict[str, Any]:
    """GET the task at ``location`` until it is DONE; fails with the last state seen."""
    task: dict[str, Any] = {}
    for _ in range(int(within / 0.05)):
        task = (await client.get(location)).json()
        if task["status"] == "DONE":
            return task
        await asyncio.sleep(0.05)
    raise AssertionError(f"not DONE within {within}s: {task}")


@asynccontextmanager
async def app_client_for(settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    """``create_app(settings)`` with its lifespan running, and an httpx client on it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@pytest.fixture
def api_settings(db_settings: DatabaseSettings) -> ApiSettings:
    return ApiSettings(
        database_url=db_settings.database_url, outbox_channel=db_settings.outbox_channel
    )


@pytest.fixture
async def client(api_settings: ApiSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app on this test's own database."""
    async with app_client_for(api_settings) as client:
        yield client


@pytest.fixture
def unreachable_database_url() -> str:
    """A DSN whose port had nothing listening when the test started."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/taskbox"


@pytest.fixture
async def down_client(unreachable_database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app whose database cannot be reached."""
    settings = ApiSettings(database_url=unreachable_database_url, outbox_channel="outbox_down")
    async with app_client_for(settings) as client:
        yield client


@pytest.fixture
async def processes() -> AsyncIterator[list[ServiceProcess]]:
    """Processes a test started; whatever is still running is killed afterwards."""
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.kill()
        if proc.proc is not None:
            await proc.wait(timeout=10)
