"""Signals and supervision for the long-running relay and consumer processes.

Signal handlers only set an event: the first SIGTERM/SIGINT asks for a graceful stop,
a second one exits at once. Background loops (listener, heartbeat, rescue) run under
``supervise`` beside the main loop: if one of them ends while the main loop still
runs, the process exits non-zero so that a supervisor restarts it, instead of leaving
a half-dead worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_LOOP_DIED = 3


class Shutdown:
    def __init__(self) -> None:
        self.requested = asyncio.Event()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.requested.is_set():
            log.warning("second %s: exiting now", sig.name)
            os._exit(128 + sig.value)
        log.info("%s received: finishing in-flight work, then exiting", sig.name)
        self.requested.set()


class LoopDied(RuntimeError):
    pass


async def supervise(
    main: Coroutine[Any, Any, None], background: dict[str, Coroutine[Any, Any, None]]
) -> None:
    """Run ``main`` to completion with ``background`` loops beside it.

    Raises LoopDied when a background loop ends first; its exception is logged.
    """
    main_task = asyncio.create_task(main, name="main")
    tasks = {asyncio.create_task(coro, name=name): name for name, coro in background.items()}
    try:
        while True:
            done, _ = await asyncio.wait([main_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if main_task in done:
                main_task.result()
                return
            for task in done:
                exc = None if task.cancelled() else task.exception()
                log.critical("background loop %r stopped", tasks[task], exc_info=exc)
                raise LoopDied(tasks[task])
    finally:
        for task in [main_task, *tasks]:
            task.cancel()
        await asyncio.gather(main_task, *tasks, return_exceptions=True)


async def wait_first(*events: asyncio.Event, within: float) -> None:
    """Return when any event is set or ``within`` seconds have passed."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


LEFTOVER_GRACE = 5.0  # seconds the tasks still alive after main get to end on a cancel


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a process's main coroutine on uvloop, as uvicorn does for the api.

    The relay and the consumer spend most of their CPU in the event loop itself (socket
    writes of publishes and acks, callbacks); uvloop does that work in C.

    Tasks still alive when ``main`` ends are cancelled and given LEFTOVER_GRACE to end;
    asyncio.Runner would wait for them for ever, and a handler the consumer abandoned
    because it ignores cancellation would keep the process from exiting.
    """
    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main)
    finally:
        try:
            _end_leftover_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def _end_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    leftovers = asyncio.all_tasks(loop)
    if not leftovers:
        return
    for task in leftovers:
        task.cancel()
    _, pending = loop.run_until_complete(asyncio.wait(leftovers, timeout=LEFTOVER_GRACE))
    for task in leftovers - pending:
        if not task.cancelled() and task.exception() is not None:
            log.debug("a task ended with %r at exit", task.exception())
    if pending:
        log.warning(
            "%d tasks ignored cancellation for %.0fs (abandoned handlers?); exiting without them",
            len(pending),
            LEFTOVER_GRACE,
        )


def being_cancelled() -> bool:
    """Whether the running task itself is being cancelled. aiormq also rejects the
    pending futures of a connection it closes by force with CancelledError; only this
    tells a real cancellation (pass it on) from that (the broker is away)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def connect_with_retry(
    what: str,
    factory: Callable[[], Awaitable[T]],
    errors: tuple[type[BaseException], ...],
    give_up_after: float = 120.0,
) -> T:
    """Call ``factory`` until it succeeds, so a process may start before its servers."""
    async for attempt in AsyncRetrying(
        wait=wait_exponential_jitter(multiplier=0.5, max=10),
        stop=stop_after_delay(give_up_after),
        retry=retry_if_exception_type(errors),
        before_sleep=lambda rs: log.warning(
            "cannot reach %s yet (%s); retrying", what, rs.outcome and rs.outcome.exception()
        ),
        reraise=True,
    ):
        with attempt:
            return await factory()
    raise AssertionError("unreachable")
