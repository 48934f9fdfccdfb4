"""/api/v1/queues: the named queues, what waits and runs in each, and who serves it."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from taskbox.api.deps import Pool
from taskbox.api.schemas import Problem, QueueList
from taskbox.db import queues

router = APIRouter(
    prefix="/api/v1/queues",
    tags=["queues"],
    responses={401: {"model": Problem, "description": "The API key is missing or not valid"}},
)


@router.get(
    "",
    response_model=QueueList,
    summary="List the queues",
    description=(
        "Every queue in use (one with unfinished tasks or recently served by a consumer, "
        "and `default` always), by name: its waiting (NEW, PENDING) and running tasks, "
        "the consumers seen serving it within the last minute, and how long its oldest "
        "waiting task has waited. A queue with tasks waiting and no consumer is one no "
        "consumer is configured for (CONSUMER_QUEUES)."
    ),
    responses={503: {"model": Problem, "description": "The database is unreachable"}},
)
async def list_queues(pool: Pool) -> QueueList:
    found = await queues.list_queues(pool)
    return QueueList.model_validate({"items": [asdict(queue) for queue in found]})
