"""Handlers that misbehave the ways real code does, for the delivery-proof tests and the
chaos run (``TASK_MODULES=tests.integration.misbehaving``).

Each one breaks a rule a handler should keep: it blocks the event loop, swallows its
cancellation, loses an inner task to a library's cancel, returns or raises what
Postgres cannot store, or ends its own process.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from pydantic import BaseModel

from taskbox.tasktypes import TaskContext, task


class Stall(BaseModel):
    seconds: float  # the event loop is blocked this long (a sync call in async code)
    then: float = 0.0  # and the handler goes on this long afterwards
    attempts: int = 1  # only the first ``attempts`` attempts stall


@task("stall", Stall)
async def stall(payload: Stall, ctx: TaskContext) -> dict[str, Any]:
    if ctx.attempt <= payload.attempts:
        time.sleep(payload.seconds)  # noqa: ASYNC251 - the misbehaviour under test
        await asyncio.sleep(payload.then)
    return {"attempt": ctx.attempt}


class Stubborn(BaseModel):
    seconds: float  # keeps running this long, whatever cancels it


@task("stubborn", Stubborn)
async def stubborn(payload: Stubborn, ctx: TaskContext) -> dict[str, Any]:
    deadline = time.monotonic() + payload.seconds
    swallowed = 0
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            swallowed += 1  # the misbehaviour under test
    return {"swallowed": swallowed}


class Nothing(BaseModel):
    pass


@task("inner-cancelled", Nothing)
async def inner_cancelled(payload: Nothing, ctx: TaskContext) -> None:
    inner = asyncio.create_task(asyncio.sleep(30))
    asyncio.get_running_loop().call_later(0.05, inner.cancel)  # a library's doing
    await inner


@task("unstorable-result", Nothing)
async def unstorable_result(payload: Nothing, ctx: TaskContext) -> dict[str, str]:
    return {"text": "a NUL \x00 jsonb refuses"}


@task("unstorable-error", Nothing)
async def unstorable_error(payload: Nothing, ctx: TaskContext) -> None:
    raise RuntimeError("a lone surrogate \ud800 the encoder refuses, and a NUL \x00")


class Exit(BaseModel):
    code: int = 1
    attempts: int = 1  # only the first ``attempts`` attempts end the process


@task("exit", Exit)
async def exit_process(payload: Exit, ctx: TaskContext) -> dict[str, int]:
    if ctx.attempt <= payload.attempts:
        os._exit(payload.code)
    return {"attempt": ctx.attempt}
