"""Which database errors mean "Postgres is away for now" rather than "the code is wrong".

One list for every process: the api answers 503 for these, the relay and the consumer
back off and retry. A Postgres restart shows up as any of them, depending on the moment
it hits: refused or reset sockets, "the database system is shutting down / starting
up", "not currently accepting connections", a terminated backend, or asyncpg's pool
tripping over a connection that died under it.
"""

from __future__ import annotations

import asyncpg

TRANSIENT_DB_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # refused, reset, unreachable
    TimeoutError,  # connect timeout, command timeout
    asyncpg.PostgresConnectionError,  # the connection is gone
    asyncpg.InterfaceError,  # e.g. "connection is closed"
    asyncpg.InternalClientError,  # asyncpg's state machine after a dropped connection
    asyncpg.OperatorInterventionError,  # admin shutdown, crash shutdown, cannot connect now
    asyncpg.ObjectNotInPrerequisiteStateError,  # database not accepting connections
    asyncpg.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.DeadlockDetectedError,  # the other transaction won; ours can simply retry
    asyncpg.SerializationError,
)
