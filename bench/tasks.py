"""The benchmark's own task type, loaded by the api and the consumer through TASK_MODULES.

``bench.timed`` returns the wall-clock time its handler started, so enqueue -> handler
start is measured where the issue asks, at the handler, as the peers' handlers measure
it, rather than at the consumer's claim (``started_at``, a transaction's start).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import RootModel

from taskbox.tasktypes import TaskContext, task


class TimedPayload(RootModel[dict[str, Any]]):
    """``{"t0": ...}``: when the client called create; carried, not read."""


@task("bench.timed", TimedPayload)
async def timed(payload: TimedPayload, ctx: TaskContext) -> dict[str, float]:
    return {"started": time.time()}
