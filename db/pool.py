"""The asyncpg connection pool and the JSON codecs every connection uses."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.settings import DatabaseSettings
from taskbox.runtime.lifecycle import connect_with_retry

log = logging.getLogger(__name__)


def _encode_jsonb(value: Any) -> bytes:
    # jsonb's binary wire format is a version byte followed by the JSON text.
    return b"\x01" + orjson.dumps(value)


def _decode_jsonb(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        format="binary",
    )


def writable(conn: asyncpg.Connection) -> bool:
    """Whether the server last said it accepts writes on ``conn``: neither a standby
    (``in_hot_standby``) nor read-only by default (``default_transaction_read_only``).

    Postgres reports both whenever they change (from 14 on), with the reply to the next
    statement; reading them costs no round trip. They are what asyncpg checks at connect
    time for ``target_session_attrs=read-write``.
    """
    settings = conn.get_settings()
    return not any(
        getattr(settings, name, "off") == "on"
        for name in ("in_hot_standby", "default_transaction_read_only")
    )


def _session_keeper(database_url: str) -> Callable[[asyncpg.Connection], Awaitable[None]]:
    """The pool's reset: nothing when a connection goes back to the pool, but drop one
    whose server no longer accepts writes.

    asyncpg's default reset sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`` on every release: a round trip on every request. Taskbox
    leaves no session state on a pooled connection (LISTEN and advisory locks live on
    dedicated connections), and asyncpg still rolls back a transaction left open.

    A server can turn read-only under an open connection (a primary set to
    ``default_transaction_read_only`` when its disk fills, or demoted by a failover
    tool): kept, the connection would fail every write until the pool retires it
    minutes later. Closed, the pool's next connect goes through the DSN's hosts again
    and, with ``target_session_attrs=read-write``, reaches the one that accepts writes.
    With a single host there is nowhere else to go: one connection a second is dropped
    at most, so that a read-only server gets its writable sessions back soon after it
    takes writes again, without a storm of new connections while it does not.
    """
    several = "," in urlsplit(database_url).netloc or "target_session_attrs" in database_url
    min_interval = 0.0 if several else 1.0
    last_drop = -min_interval

    async def keep_session(conn: asyncpg.Connection) -> None:
        nonlocal last_drop
        if writable(conn):
            return
        now = time.monotonic()
        if now - last_drop < min_interval:
            return
        last_drop = now
        log.warning("the database server no longer accepts writes; closing the connection")
        conn.terminate()

    return keep_session


async def connect(
    settings: DatabaseSettings, server_settings: dict[str, str] | None = None
) -> asyncpg.Connection:
    """A single connection outside the pool (the relay's LISTEN connection, the
    scheduler's leader session), with session ``server_settings`` if given."""
    conn = await asyncpg.connect(
        settings.database_url,
        command_timeout=settings.db_command_timeout,
        timeout=settings.db_connect_timeout,
        server_settings=server_settings,
    )
    await init_connection(conn)
    return conn


async def create_pool(settings: DatabaseSettings, **overrides: Any) -> asyncpg.Pool:
    options: dict[str, Any] = {
        "min_size": settings.db_pool_min_size,
        "max_size": settings.db_pool_max_size,
        "command_timeout": settings.db_command_timeout,
        # asyncpg waits 60 s for a connection by default; an unreachable server should
        # surface (as a 503 in the api) long before a client gives up.
        "timeout": settings.db_connect_timeout,
        "init": init_connection,
        "reset": _session_keeper(settings.database_url),
    }
    options.update(overrides)
    pool = await asyncpg.create_pool(settings.database_url, **options)
    assert pool is not None
    return pool


async def open_pool(settings: DatabaseSettings) -> asyncpg.Pool:
    """The relay's and the consumer's pool, waiting for Postgres as long as
    ``connect_with_retry`` does, so a process may start before its database."""
    return await connect_with_retry(
        "Postgres",
        lambda: create_pool(settings),
        (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError),
    )
