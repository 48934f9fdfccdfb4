"""The relay wake-up, sent after the task's commit and coalesced.

A NOTIFY inside the insert transaction serialises commits on a cluster-wide lock
(DESIGN.md measured 0.54x the commit rate). Sent after the commit instead, with at
most one in flight per process, a burst of creates costs a couple of NOTIFYs. A lost
wake-up costs at most the relays' poll interval, so failures are only logged.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from db.outbox import notify

log = logging.getLogger(__name__)


class OutboxNotifier:
    def __init__(self, pool: asyncpg.Pool, channel: str) -> None:
        self._pool = pool
        self._channel = channel
        self._inflight: asyncio.Task[None] | None = None
        self._again = False

    def wake(self) -> None:
        if self._inflight is not None:
            # A commit that lands while a NOTIFY is in flight needs one more after it:
            # the relay may have already drained before this row was visible.
            self._again = True
            return
        self._inflight = asyncio.create_task(self._send())

    async def _send(self) -> None:
        try:
            again = True
            while again:
                self._again = False
                try:
                    await notify(self._pool, self._channel)
                except Exception as exc:  # the poll is the safety net
                    log.warning("outbox wake-up not sent: %s", exc)
                    return
                again = self._again
        finally:
            self._inflight = None

    async def close(self) -> None:
        if self._inflight is not None:
            await asyncio.gather(self._inflight, return_exceptions=True)
