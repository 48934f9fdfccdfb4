"""A task module that keeps its types on a registry instance of its own (loaded as
``TASK_MODULES=tests.unit.sample_registry_module:app``), not on the global one."""

from __future__ import annotations

from pydantic import BaseModel

from taskbox import AttemptEvent, TaskContext, TaskRegistry

app = TaskRegistry()
not_a_registry = "just a string"
seen: list[str] = []


class Shout(BaseModel):
    text: str


@app.task("sample-shout", Shout, max_attempts=4)
async def shout(payload: Shout, ctx: TaskContext) -> dict[str, str]:
    return {"shout": payload.text.upper()}


@app.on("success")
def remember(event: AttemptEvent) -> None:
    seen.append(event.task_type)


alias = app
