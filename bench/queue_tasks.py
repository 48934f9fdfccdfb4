"""Task types of the queue-isolation benchmark (``scenarios.isolation``), loaded by the
api and the consumer with ``TASK_MODULES=bench.queue_tasks:app``.

The default queue's load is the built-in ``echo``; ``bench.slow`` is the heavy neighbour
on queue ``slow``. A registry of its own, so that the peers' ``bench.tasks`` stays as
it is.
"""

from __future__ import annotations

import time

from pydantic import BaseModel, Field

from taskbox.tasktypes import TaskContext, TaskRegistry

SLOW_QUEUE = "slow"
SLOW_TYPE = "bench.slow"

app = TaskRegistry()


class SlowPayload(BaseModel):
    seconds: float = Field(ge=0, le=60)


@app.task(SLOW_TYPE, SlowPayload, queue=SLOW_QUEUE)
def slow(payload: SlowPayload, ctx: TaskContext) -> dict[str, float]:
    # A plain def that blocks: it holds one of the slow pool's handler threads for the
    # whole attempt, as a CPU- or IO-bound job of a real slow queue would.
    time.sleep(payload.seconds)
    return {"slept": payload.seconds}
