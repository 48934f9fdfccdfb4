"""Connections to RabbitMQ that know every node AMQP_URL names.

aio-pika's RobustConnection reconnects to the one URL it was given: with a cluster, a
client whose node died would keep knocking on that node while two others serve. Here a
robust connection holds the whole list and moves on to the next node after every
failure: a connection lost, or an attempt refused. aio-pika calls
``_on_connection_close`` exactly once for each of those (a failed attempt included,
through ``UnderlayConnection.connect``), and reads ``self.url`` afresh on each attempt,
so moving ``self.url`` there is the whole change; channels, declarations and consumers
are restored on the new node by RobustConnection as after any reconnect.

The first pass through the list after a loss is quick (``NEXT_NODE_PAUSE`` between
nodes): a client should not wait aio-pika's reconnect interval (5 s) before trying a
node it has not tried yet. Once every node failed in a row, it waits the full interval
between attempts, as a single-URL connection does.

With one URL nothing of this is used: aio-pika's own ``connect_robust`` and ``connect``,
as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from pamqp.common import FieldTable
from yarl import URL

from taskbox.broker.nodes import where

log = logging.getLogger(__name__)

NEXT_NODE_PAUSE = 0.2  # seconds between two nodes not yet tried since the last loss


class FailoverConnection(RobustConnection):
    """A RobustConnection that reconnects to the next of ``urls`` each time."""

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        self._nodes = [URL(url) for url in urls]
        self._current = 0
        self._failed_in_a_row = 0
        super().__init__(self._nodes[0], **kwargs)
        self._full_interval: float = self.reconnect_interval

    @property
    def node(self) -> str:
        """host:port of the node in use (or to be tried next)."""
        return where(str(self._nodes[self._current]))

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self._close_called:
            self._move_on()
        await super()._on_connection_close(closing)

    def _move_on(self) -> None:
        left = self.node
        self._current = (self._current + 1) % len(self._nodes)
        self._failed_in_a_row += 1
        # self.url is what the next attempt connects to (and what aio-pika logs, with
        # the password masked).
        self.url = self._nodes[self._current]
        whole_round = self._failed_in_a_row % len(self._nodes) == 0
        self.reconnect_interval = self._full_interval if whole_round else NEXT_NODE_PAUSE
        log.info("RabbitMQ node %s lost or refused; next: %s", left, self.node)

    async def _on_connected(self) -> None:
        await super()._on_connected()
        self._failed_in_a_row = 0
        self.reconnect_interval = self._full_interval


# Each connect and reconnect attempt gives up after this long. aiormq waits for the
# broker's handshake without a bound of its own, so a node that accepts TCP but never
# speaks AMQP (a frozen VM, half a partition) would hold a process for ever, and with a
# list of nodes it would never move on to the next.
CONNECT_TIMEOUT = 10.0


async def connect_robust(
    urls: Sequence[str], client_properties: FieldTable | None = None
) -> AbstractRobustConnection:
    """A robust connection to the first node of ``urls`` that answers; it reconnects
    to the next ones in turn. Raises the last node's error when none answers."""
    if len(urls) == 1:
        return await aio_pika.connect_robust(
            urls[0], client_properties=client_properties, timeout=CONNECT_TIMEOUT
        )
    error: BaseException | None = None
    for start in range(len(urls)):
        # Each try begins at another node, so the first node being down does not stop
        # a process from starting (aio-pika's first attempt fails fast, by design).
        order = [*urls[start:], *urls[:start]]
        connection = FailoverConnection(
            order,
            **({"client_properties": client_properties} if client_properties else {}),
        )
        try:
            await connection.connect(timeout=CONNECT_TIMEOUT)
        except CONNECTION_EXCEPTIONS as exc:
            error = exc
            log.warning("cannot reach RabbitMQ node %s: %s", where(order[0]), exc)
            await connection.close()
            continue
        return connection
    assert error is not None
    raise error


async def connect(urls: Sequence[str], connect_timeout: float | None = None) -> AbstractConnection:
    """A plain connection to the first node of ``urls`` that answers, for a short-lived
    command; raises the last node's error when none answers."""
    error: BaseException | None = None
    for url in urls:
        try:
            return await aio_pika.connect(url, timeout=connect_timeout)
        except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
            error = exc
    assert error is not None
    raise error
