"""Which database errors are "Postgres is away for now": the api's 503, the workers'
retry. A failover shows every one of these, depending on the moment it hits."""

from __future__ import annotations

import asyncpg
import pytest

from taskbox.db.errors import TRANSIENT_DB_ERRORS, nothing_committed


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "refused"),  # the dead primary's port
        ConnectionResetError(104, "reset"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is in recovery mode"),
        asyncpg.TargetServerAttributeNotMatched("None of the hosts match"),  # no primary yet
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InternalClientError("cannot switch to state 12"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        TimeoutError(),
    ],
    ids=lambda error: type(error).__name__,
)
def test_what_a_failover_throws_is_transient(error: Exception) -> None:
    assert isinstance(error, TRANSIENT_DB_ERRORS)
    # A group of creates that failed so is answered 503 together, not retried one by
    # one (which, for a read-only server, used to end in a 500 each).
    assert not nothing_committed(error)
