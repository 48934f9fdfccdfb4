"""consumer/worker.py _settle: settling a message on a channel that went away."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import aiormq
import pytest

from consumer.worker import _settle


class FakeMessage:
    """Stands in for aio-pika's IncomingMessage: each settle call raises or hangs."""

    def __init__(self, error: BaseException | None = None, hang: bool = False) -> None:
        self.error = error
        self.hang = hang
        self.calls: list[str] = []
        self.called = asyncio.Event()

    async def _call(self, name: str) -> None:
        self.calls.append(name)
        self.called.set()
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error

    async def ack(self) -> None:
        await self._call("ack")

    async def nack(self, requeue: bool = True) -> None:
        await self._call(f"nack requeue={requeue}")

    async def reject(self, requeue: bool = False) -> None:
        await self._call(f"reject requeue={requeue}")


@pytest.mark.parametrize(
    "error",
    [
        aiormq.exceptions.ChannelInvalidStateError("<Channel: 1> closed"),
        aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"),
        ConnectionResetError("Connection lost"),
        # aiormq rejects the pending writes of a connection it closes by force with this.
        asyncio.CancelledError(),
    ],
    ids=["channel-closed", "connection-closed", "reset", "closed-by-force"],
)
@pytest.mark.parametrize(
    ("how", "call"),
    [("ack", "ack"), ("requeue", "nack requeue=True"), ("dead-letter", "reject requeue=False")],
)
async def test_a_gone_channel_is_logged_not_raised(
    error: BaseException, how: str, call: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="consumer.worker")
    message = FakeMessage(error)
    await _settle(cast(Any, message), how)
    assert message.calls == [call]
    assert "it will be redelivered" in caplog.text


async def test_cancelling_the_settling_task_still_cancels_it() -> None:
    message = FakeMessage(hang=True)
    settling = asyncio.create_task(_settle(cast(Any, message), "ack"))
    await message.called.wait()
    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling
