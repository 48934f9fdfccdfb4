"""The consumer's presence: which queues it serves, recorded in Postgres for the api.

The api never talks to RabbitMQ, yet must tell a queue being served from one with work
and no consumer. Each consumer upserts one row per queue it serves
(``queue_consumers``) every PRESENCE_INTERVAL; a queue counts the rows refreshed within
PRESENCE_WINDOW (``db.queues``). One small statement per interval per process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg

from taskbox.db import queues
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.runtime.queues import PRESENCE_INTERVAL

log = logging.getLogger(__name__)


async def presence_loop(
    pool: asyncpg.Pool, served: Sequence[tuple[str, str]], interval: float = PRESENCE_INTERVAL
) -> None:
    """Record every ``interval`` seconds that each (queue, worker id) of ``served`` is
    served; an outage is waited out (the queue then looks unserved, as it may be)."""
    while True:
        try:
            await queues.consumers_seen(pool, served)
        except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
            # Monitoring only: a database not yet migrated or a role without the grant
            # (taskbox roles not rerun) must not stop the consumer.
            log.warning("could not record the queues served: %s", exc)
        await asyncio.sleep(interval)
