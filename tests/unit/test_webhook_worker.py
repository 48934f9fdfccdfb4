"""The delivery worker outlives a claim that fails in a way no database outage
explains (a bug, a row it cannot read): it shares the relay with the outbox publisher,
and a dead loop stops the whole relay. The store is faked: only the loop is tested."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from taskbox.db import webhooks as store
from taskbox.relay.metrics import RelayMetrics
from taskbox.relay.settings import RelaySettings
from taskbox.relay.webhooks import DeliveryWorker


class FakePool:
    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[None]:
        yield None


async def test_an_unexpected_claim_error_is_survived_and_the_claims_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    claims = 0
    again = asyncio.Event()

    async def claim_due(*_: Any) -> list[Any]:
        nonlocal claims
        claims += 1
        if claims == 1:
            raise ValueError("a row the claim cannot read")
        again.set()
        return []

    async def pending_backlog(*_: Any) -> int:
        return 0

    monkeypatch.setattr(store, "claim_due", claim_due)
    monkeypatch.setattr(store, "pending_backlog", pending_backlog)
    settings = RelaySettings(_env_file=None, webhook_poll_interval=0.01)
    worker = DeliveryWorker(FakePool(), settings, asyncio.Event(), RelayMetrics())
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(again.wait(), timeout=5)
        assert not running.done()
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
