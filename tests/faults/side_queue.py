"""A task type on a second queue, for the chaos run (``TASK_MODULES=...,
tests.faults.side_queue``): its tasks flow through their own AMQP queue while the run
pauses and resumes that queue among the faults."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from taskbox.tasktypes import TaskContext, task

SIDE_QUEUE = "side"


class Side(BaseModel):
    n: int
    tag: str


@task("side-echo", Side, queue=SIDE_QUEUE)
async def side_echo(payload: Side, ctx: TaskContext) -> dict[str, Any]:
    return payload.model_dump()
