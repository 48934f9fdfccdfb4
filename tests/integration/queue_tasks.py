"""Task types on named queues, for tests/integration/test_queues.py
(``TASK_MODULES=tests.integration.queue_tasks:app``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from taskbox.tasktypes import TaskContext, TaskRegistry

app = TaskRegistry()


class Item(BaseModel):
    n: int = 0


@app.task("render", Item, queue="media")
async def render(payload: Item, ctx: TaskContext) -> dict[str, Any]:
    return {"rendered": payload.n}


@app.task("report", Item)  # the default queue
async def report(payload: Item, ctx: TaskContext) -> dict[str, Any]:
    return {"reported": payload.n}


@app.task("thumb", Item, queue=("media", "bulk"))  # media its own, bulk allowed
def thumb(payload: Item, ctx: TaskContext) -> dict[str, Any]:
    return {"thumb": payload.n}
