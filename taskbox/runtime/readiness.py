"""Readiness checks shared by the relay and the consumer: Postgres answers, the AMQP
connection is up."""

from __future__ import annotations

import asyncpg
from aio_pika.abc import AbstractConnection

from taskbox.runtime.probes import ReadinessCheck


def database_check(pool: asyncpg.Pool) -> ReadinessCheck:
    async def check() -> str | None:
        await pool.fetchval("SELECT 1")
        return None

    return check


def broker_check(connection: AbstractConnection) -> ReadinessCheck:
    async def check() -> str | None:
        if connection.is_closed:
            return "connection closed"
        # A robust connection clears this while it reconnects.
        if not connection.connected.is_set():
            return "reconnecting"
        return None

    return check
