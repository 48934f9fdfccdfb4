"""The relay wake-up, sent after the task's commit and throttled.

A NOTIFY inside the insert transaction serialises commits on a cluster-wide lock
(DESIGN.md measured 0.54x the commit rate). Sent after the commit instead, it costs a
statement of its own, on the api and in Postgres, and wakes every relay for a claim;
one per created task took a tenth of the ingest rate. So a process sends at most one
every ``min_interval`` seconds: the first commit after a quiet spell wakes the relays at
once, and commits that land while a wake-up is pending or was just sent share the next
one, sent when the interval is up. A relay that is already draining picks those rows
up anyway. A lost wake-up costs at most the relays' poll interval, so failures are only
logged.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from taskbox.db.outbox import notify

log = logging.getLogger(__name__)


class OutboxNotifier:
    def __init__(self, pool: asyncpg.Pool, channel: str, min_interval: float = 0.002) -> None:
        self._pool = pool
        self._channel = channel
        self._min_interval = min_interval
        self._pending = False  # a wake-up is scheduled and has not been sent yet
        self._last_sent = float("-inf")
        self._sending: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Call after a commit: a NOTIFY sent after this call covers the new rows."""
        if self._pending:
            return
        self._pending = True
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_sent + self._min_interval - loop.time())
        task = asyncio.create_task(self._send(delay))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        # From here on a new commit needs a wake-up of its own: this one may already be
        # on its way past the relay's claim.
        self._pending = False
        self._last_sent = asyncio.get_running_loop().time()
        try:
            await notify(self._pool, self._channel)
        except Exception as exc:  # the poll is the safety net
            log.warning("outbox wake-up not sent: %s", exc)

    async def close(self) -> None:
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
