"""Breaks the relay's LISTEN loop from inside, for the exit-status test.

Imported at interpreter start by a ``sitecustomize`` the test puts on PYTHONPATH, so
the process is the real ``python -m relay``; only ``OutboxListener.run`` is wrapped:
it runs as usual until the process receives SIGUSR1, then raises, as a bug would.
"""

from __future__ import annotations

import asyncio
import signal

from taskbox.relay.listener import OutboxListener

_listen = OutboxListener.run


async def _run_until_sigusr1(self: OutboxListener) -> None:
    broken = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, broken.set)
    listening = asyncio.create_task(_listen(self))
    try:
        await broken.wait()
    finally:
        listening.cancel()
    raise RuntimeError("LISTEN loop broken on purpose by the fault test")


OutboxListener.run = _run_until_sigusr1  # type: ignore[method-assign]
