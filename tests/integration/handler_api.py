"""Handlers written with the handler API, for test_handler_api
(``TASK_MODULES=tests.integration.handler_api``): a plain ``def`` that blocks in
time.sleep, and one that asks for its second attempt later with ``Retry``."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from taskbox.tasktypes import Retry, TaskContext, task


class Nap(BaseModel):
    seconds: float


@task("blocking-nap", Nap)
def blocking_nap(payload: Nap, ctx: TaskContext) -> dict[str, float]:
    time.sleep(payload.seconds)  # a sync handler: the consumer runs it in its thread pool
    return {"slept": payload.seconds}


class Later(BaseModel):
    in_seconds: float


@task("retry-later", Later)
async def retry_later(payload: Later, ctx: TaskContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        # The message carries when the first attempt asked, for the test to compare.
        raise Retry(in_seconds=payload.in_seconds, message=repr(time.time()))
    return {"attempt": ctx.attempt, "started": time.time()}
