"""The relay's LISTEN connection, which proves it is alive by notifying itself.

A NOTIFY is only a hint that rows are waiting; the drain loop also polls. The listener
holds a dedicated connection outside the pool (a pooled one could be handed back with
its LISTEN gone). Every check interval it sends a NOTIFY to a private channel on that
same connection and waits for it to come back: a connection that looks open but
delivers nothing (a half-dead TCP link, a terminated backend) is replaced. Each
(re)connect wakes the drain loop, since notifications may have been missed meanwhile.

Other loops of the relay (the webhook delivery worker) listen on the same connection,
each on its own channel with its own wake-up: one LISTEN connection per relay, checked
once, whatever it listens for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg
from tenacity import AsyncRetrying, retry_if_exception_type, stop_never, wait_exponential_jitter

from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.pool import connect, writable
from taskbox.db.settings import DatabaseSettings

log = logging.getLogger(__name__)


class OutboxListener:
    def __init__(
        self,
        settings: DatabaseSettings,
        wake: asyncio.Event,
        check_interval: float,
        channels: Mapping[str, asyncio.Event] | None = None,
    ) -> None:
        self._settings = settings
        self._wake = wake
        # further channels, each with the wake-up of the loop it is for
        self._channels = dict(channels or {})
        self._check_interval = check_interval
        self._check_channel = (
            f"{settings.outbox_channel}_check_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        )
        self._echo: asyncio.Queue[str] = asyncio.Queue()
        self._lost = asyncio.Event()
        self.reconnects = 0
        self.healthy = False

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == self._check_channel:
            self._echo.put_nowait(payload)
        else:
            self._channels.get(channel, self._wake).set()

    def _on_terminated(self, _conn: Any) -> None:
        self._lost.set()

    async def _connect(self) -> asyncpg.Connection:
        async for attempt in AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.2, max=10),
            stop=stop_never,
            retry=retry_if_exception_type((*TRANSIENT_DB_ERRORS, asyncpg.PostgresError)),
            before_sleep=lambda rs: log.warning(
                "LISTEN connection failed (%s); retrying", rs.outcome and rs.outcome.exception()
            ),
            reraise=True,
        ):
            with attempt:
                conn = await connect(self._settings)
                await conn.add_listener(self._settings.outbox_channel, self._on_notify)
                await conn.add_listener(self._check_channel, self._on_notify)
                for channel in self._channels:
                    await conn.add_listener(channel, self._on_notify)
                conn.add_termination_listener(self._on_terminated)
                return conn
        raise AssertionError("unreachable")

    async def _alive(self, conn: asyncpg.Connection) -> bool:
        token = uuid.uuid4().hex
        try:
            await conn.execute("SELECT pg_notify($1, $2)", self._check_channel, token)
            async with asyncio.timeout(self._check_interval):
                while (await self._echo.get()) != token:
                    pass
        except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("LISTEN self-check failed: %s", type(exc).__name__)
            return False
        if not writable(conn):
            # NOTIFY still works on a read-only server, but the api's wake-ups now go to
            # the one that accepts writes, which the reconnect finds.
            log.warning("LISTEN connection's server no longer accepts writes")
            return False
        return True

    async def run(self) -> None:
        first = True
        while True:
            conn = await self._connect()
            self._lost.clear()
            if not first:
                self.reconnects += 1
                log.info("LISTEN connection re-established")
            first = False
            self.healthy = True
            self._wake.set()
            for wake in self._channels.values():
                wake.set()
            try:
                while not self._lost.is_set():
                    try:
                        async with asyncio.timeout(self._check_interval):
                            await self._lost.wait()
                    except TimeoutError:
                        pass
                    if self._lost.is_set() or not await self._alive(conn):
                        break
            finally:
                self.healthy = False
                conn.terminate()
            log.warning("LISTEN connection lost; reconnecting")
