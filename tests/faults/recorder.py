"""A handler-side record of executions, loaded into consumers by the fault tests.

With ``TASK_MODULES=tests.faults.recorder`` and ``TASKBOX_EXECUTION_LOG=<file>``, every
registered handler (the built-ins included) first appends ``<task_id> <attempt> <pid>``
to the file and then runs unchanged. One ``write(2)`` on an O_APPEND descriptor per
line: lines from several consumers never interleave, and a line survives a SIGKILL
right after it, so the checker sees every execution that started, even one killed
mid-handler.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from taskbox.tasktypes import TaskContext, default_registry
from taskbox.tasktypes.registry import Handler

ENV = "TASKBOX_EXECUTION_LOG"


def _recorded(handler: Handler, fd: int) -> Handler:
    async def run(payload: Any, ctx: TaskContext) -> Any:
        os.write(fd, f"{ctx.task_id} {ctx.attempt} {os.getpid()}\n".encode())
        return await handler(payload, ctx)

    return run


def install(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # The registry has no "replace" on purpose; this test instrument swaps the entries.
    types = default_registry._types
    for name, task_type in list(types.items()):
        types[name] = dataclasses.replace(task_type, handler=_recorded(task_type.handler, fd))


def read(path: str) -> list[tuple[str, int, int]]:
    """The recorded executions: (task id, attempt, consumer pid), in order."""
    if not os.path.exists(path):
        return []
    with open(path) as lines:
        return [
            (task_id, int(attempt), int(pid))
            for task_id, attempt, pid in (line.split() for line in lines if line.strip())
        ]


if os.environ.get(ENV):
    install(os.environ[ENV])
