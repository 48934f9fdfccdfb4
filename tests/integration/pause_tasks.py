"""Task types for tests/integration/test_queue_pause.py
(``TASK_MODULES=tests.integration.pause_tasks:app``)."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from taskbox.tasktypes import TaskContext, TaskRegistry

app = TaskRegistry()


class Item(BaseModel):
    n: int = 0
    seconds: float = 0.0


@app.task("render", Item, queue="media")
async def render(payload: Item, ctx: TaskContext) -> dict[str, Any]:
    await asyncio.sleep(payload.seconds)
    return {"rendered": payload.n}


@app.task("report", Item)  # the default queue
async def report(payload: Item, ctx: TaskContext) -> dict[str, Any]:
    return {"reported": payload.n}


@app.task("flaky", Item, queue="media", retry_base=0.2, retry_max=0.2, retry_jitter=0)
async def flaky(payload: Item, ctx: TaskContext) -> dict[str, Any]:
    """Fails its first attempt after ``seconds``: a retry born while its queue is paused."""
    await asyncio.sleep(payload.seconds)
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return {"flaky": payload.n, "attempt": ctx.attempt}
