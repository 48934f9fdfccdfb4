"""Which database errors mean "Postgres is away for now" rather than "the code is wrong".

One list for every process: the api answers 503 for these, the relay and the consumer
back off and retry. A Postgres restart shows up as any of them, depending on the moment
it hits: refused or reset sockets, "the database system is shutting down / starting
up", "not currently accepting connections", a terminated backend, or asyncpg's pool
tripping over a connection that died under it. A primary failover adds "no host is
writable yet" (asyncpg's TargetServerAttributeNotMatched, an InternalClientError, when
the DSN lists several hosts with target_session_attrs=read-write) and "cannot execute
... in a read-only transaction" from a server that stopped accepting writes under an
open connection (db/pool.py then drops that connection).
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
    # The server turned read-only (demoted, or default_transaction_read_only when its
    # disk fills): nothing was written; the next connection may find a writable host.
    asyncpg.ReadOnlySQLTransactionError,
)


def nothing_committed(exc: BaseException) -> bool:
    """Whether ``exc`` proves that a failed statement committed nothing: Postgres
    refused it (and rolled it back), or asyncpg could not encode an argument and sent
    nothing. Anything else (a lost connection, a failure after the reply) may have
    followed the commit, and writing the same rows again could store them twice."""
    if isinstance(exc, asyncpg.exceptions._base.DataError):  # client side: never sent
        return True
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, TRANSIENT_DB_ERRORS)
