"""A user's task module, as TASK_MODULES would name it (tests/unit/test_builtins.py)."""

from __future__ import annotations

from pydantic import BaseModel

from taskbox.tasktypes import TaskContext, task


class Greeting(BaseModel):
    name: str


@task("sample-greet", Greeting)
async def greet(payload: Greeting, ctx: TaskContext) -> dict[str, str]:
    return {"greeting": f"hello {payload.name}"}
