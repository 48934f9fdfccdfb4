"""Apply the alembic migrations; the schema is only ever created this way."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config

from taskbox.db.settings import DatabaseSettings

_SCRIPTS = Path(__file__).parent / "alembic"


def alembic_config(settings: DatabaseSettings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    # ConfigParser interpolation would choke on a '%' in a password.
    config.set_main_option("sqlalchemy.url", settings.sqlalchemy_url.replace("%", "%%"))
    return config


async def ensure_database(settings: DatabaseSettings) -> bool:
    """Create the target database when it does not exist yet; True if it was created.

    So that ``make migrate`` works on a fresh server without a manual ``createdb``.
    """
    try:
        conn = await asyncpg.connect(settings.database_url)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    maintenance = await asyncpg.connect(settings.database_url, database="postgres")
    try:
        dbname = settings.database_url.rsplit("/", 1)[-1].split("?", 1)[0]
        quoted = await maintenance.fetchval("SELECT quote_ident($1)", dbname)
        await maintenance.execute(f"CREATE DATABASE {quoted}")
    finally:
        await maintenance.close()
    return True


def upgrade(settings: DatabaseSettings, revision: str = "head") -> None:
    """Bring the database to ``revision`` (must not run inside an event loop)."""
    command.upgrade(alembic_config(settings), revision)


def migrate(settings: DatabaseSettings) -> None:
    asyncio.run(ensure_database(settings))
    upgrade(settings)
