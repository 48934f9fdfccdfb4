"""Group commit for single creates: concurrent creates share one statement and one commit.

A lone create is one statement and one durable commit, and the commit is most of what a
create costs Postgres (pgbench: the create statement alone committed about half as
often as a bare one-row INSERT). So the api sends a create at once when no statement of
this kind is on its way, and otherwise lets it wait for one to come back: everything
that arrived meanwhile goes out together, as one statement and one commit. On a quiet
api a create goes out alone and waits for nothing; under load the groups grow by
themselves to what arrives during one commit, as Postgres's own group commit does with
WAL flushes.

Nothing is answered before its commit. When a group fails and nothing of it can have
been committed (Postgres refused the statement, or it was never sent), each create is
tried again alone, so a task that only Postgres refuses fails its own request and no
other. When the outcome is unknown (the connection went away during the commit), every
create of the group gets that error, as a lone create would: trying again could store a
task twice.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Row = TypeVar("Row")


class GroupCommit(Generic[Item, Row]):
    """Writes items through ``write_many`` in groups, or ``write_one`` when alone.

    ``write_many`` returns one row per item, in the items' order. ``retry_alone(exc)``
    says whether a failed group may be written again item by item, that is whether
    ``exc`` proves that nothing of the group was committed.
    """

    def __init__(
        self,
        write_one: Callable[[Item], Awaitable[Row]],
        write_many: Callable[[list[Item]], Awaitable[list[Row]]],
        retry_alone: Callable[[Exception], bool],
        *,
        max_size: int = 64,
        max_in_flight: int = 2,
    ) -> None:
        self._write_one = write_one
        self._write_many = write_many
        self._retry_alone = retry_alone
        self._max_size = max_size
        # Two statements on their way keep the api busy reading requests for the next
        # group while Postgres commits the last one; more would make groups smaller.
        self._max_in_flight = max_in_flight
        self._waiting: deque[tuple[Item, asyncio.Future[Row]]] = deque()
        self._flushes: set[asyncio.Task[None]] = set()

    async def write(self, item: Item) -> Row:
        """Write ``item`` (alone or with others) and return its row once committed."""
        future: asyncio.Future[Row] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if len(self._flushes) < self._max_in_flight:
            self._start()
        # Cancelling the caller does not cancel the group: a row already on its way
        # may be committed, exactly as a lone statement cancelled in flight may be.
        return await future

    def _start(self) -> None:
        flush = asyncio.create_task(self._flush())
        self._flushes.add(flush)
        flush.add_done_callback(self._flushed)

    def _flushed(self, flush: asyncio.Task[None]) -> None:
        self._flushes.discard(flush)
        if self._waiting and len(self._flushes) < self._max_in_flight:
            self._start()

    async def _flush(self) -> None:
        # The group is taken when the flush runs, not when it was started, so that
        # every create that arrived in the meantime goes with it.
        group: list[tuple[Item, asyncio.Future[Row]]] = []
        while self._waiting and len(group) < self._max_size:
            item, future = self._waiting.popleft()
            if not future.done():  # a caller cancelled before its item went out
                group.append((item, future))
        if not group:
            return
        try:
            await self._send(group)
        finally:
            # Only a cancelled flush (the api stopping) leaves futures open.
            for _, future in group:
                if not future.done():
                    future.cancel()

    async def _send(self, group: list[tuple[Item, asyncio.Future[Row]]]) -> None:
        try:
            if len(group) == 1:
                rows = [await self._write_one(group[0][0])]
            else:
                rows = await self._write_many([item for item, _ in group])
        except Exception as exc:
            if len(group) > 1 and self._retry_alone(exc):
                await asyncio.gather(*(self._alone(item, future) for item, future in group))
            else:
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
            return
        for (_, future), row in zip(group, rows, strict=True):
            if not future.done():
                future.set_result(row)

    async def _alone(self, item: Item, future: asyncio.Future[Row]) -> None:
        try:
            row = await self._write_one(item)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
        else:
            if not future.done():
                future.set_result(row)

    async def close(self) -> None:
        """Wait for the groups on their way."""
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
