"""Bulk actions on tasks: ``POST /api/v1/tasks/cancel`` and ``/retry`` by a filter, and
their audit and progress under ``/api/v1/task-actions``. The work is db.actions', the
same the CLI's ``taskbox tasks cancel|retry`` runs."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.exceptions import HTTPException

from taskbox.api import pagination
from taskbox.api.action_schemas import (
    BulkAction,
    BulkActionResult,
    BulkRetry,
    TaskActionPage,
    TaskActionView,
)
from taskbox.api.auth import caller_name
from taskbox.api.deps import Pool
from taskbox.api.routes.responses import NOT_JSON, TOO_LARGE
from taskbox.api.schemas import Problem
from taskbox.api.service import InvalidRequest
from taskbox.db import actions

Responses = dict[int | str, dict[str, Any]]

_UNAUTHORIZED: Responses = {
    401: {"model": Problem, "description": "The API key is missing or not valid"}
}
_UNAVAILABLE: Responses = {503: {"model": Problem, "description": "The database is unreachable"}}
_INVALID: Responses = {
    422: {
        "model": Problem,
        "description": "The body is invalid, or names no criterion (nor `all: true`); "
        "`errors` says where",
    }
}

bulk_router = APIRouter(prefix="/api/v1/tasks", tags=["tasks"], responses=_UNAUTHORIZED)
router = APIRouter(prefix="/api/v1/task-actions", tags=["task actions"], responses=_UNAUTHORIZED)

_HOW = (
    " Tasks are taken oldest first in chunks, each chunk its own short transaction, "
    "and the action's progress (`GET /api/v1/task-actions/{action_id}`) is updated after "
    "each; tasks created after the action started are left alone. The answer comes when "
    "the action is done. Every action, dry runs included, is recorded with the API key's "
    "name and the reason. `dry_run: true` changes nothing: it answers the count, what "
    "would change, and a sample."
)


async def _perform(
    request: Request, pool: Pool, action: actions.Action, body: BulkAction, force: bool
) -> BulkActionResult:
    actor = caller_name(request.headers.get("authorization"), request.app.state.api_key_names)
    bulk = actions.BulkRequest(
        action=action,
        filter=body.task_filter(),
        reason=body.reason,
        actor=actor,
        dry_run=body.dry_run,
        force=force,
    )
    async with pool.acquire() as conn:
        outcome = await actions.run(conn, bulk, outbox_channel=request.app.state.outbox_channel)
    sample = [asdict(task) for task in outcome.sample] if body.dry_run else None
    return BulkActionResult.model_validate({**asdict(outcome.action), "sample": sample})


@bulk_router.post(
    "/cancel",
    response_model=BulkActionResult,
    summary="Cancel every task a filter selects",
    description="As `DELETE /api/v1/tasks/{task_id}` for each selected task: NEW and "
    "PENDING tasks become CANCELLED, PROCESSING ones are flagged `cancel_requested`; "
    "finished ones are skipped and counted." + _HOW,
    responses={**TOO_LARGE, **NOT_JSON, **_INVALID, **_UNAVAILABLE},
)
async def cancel_tasks(body: BulkAction, request: Request, pool: Pool) -> BulkActionResult:
    return await _perform(request, pool, "cancel", body, force=False)


@bulk_router.post(
    "/retry",
    response_model=BulkActionResult,
    summary="Retry every task a filter selects",
    description="The operator's replay (`taskbox replay`): each selected PENDING or FAILED "
    "task (with `force`, DONE and CANCELLED too) goes back to NEW with a new outbox row "
    "that the relays publish; PROCESSING ones are never retried. Other tasks are skipped "
    "and counted." + _HOW,
    responses={**TOO_LARGE, **NOT_JSON, **_INVALID, **_UNAVAILABLE},
)
async def retry_tasks(body: BulkRetry, request: Request, pool: Pool) -> BulkActionResult:
    return await _perform(request, pool, "retry", body, force=body.force)


@router.get(
    "",
    response_model=TaskActionPage,
    summary="List bulk actions, newest first",
    description="Every bulk cancel and retry, dry runs included: who, why, what it "
    "selected and its progress. Pass `next_cursor` back as `cursor` for older ones.",
    responses={
        422: {"model": Problem, "description": "A query parameter is invalid"},
        **_UNAVAILABLE,
    },
)
async def list_task_actions(
    request: Request,
    pool: Pool,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
    ] = None,
) -> TaskActionPage:
    for name in ("limit", "cursor"):
        # FastAPI reads the last of repeated values; a client repeating one made a mistake.
        if len(request.query_params.getlist(name)) > 1:
            raise InvalidRequest.at(["query", name], f"give {name} once", "value_error")
    before = None
    if cursor is not None:
        try:
            before = pagination.decode_id(cursor)
        except pagination.InvalidCursor as exc:
            raise InvalidRequest.at(["query", "cursor"], str(exc)) from None
    # One more than asked tells whether an older page exists.
    found = await actions.list_page(pool, limit + 1, before)
    page = found[:limit]
    next_cursor = pagination.encode_id(page[-1].id) if len(found) > limit else None
    return TaskActionPage.model_validate(
        {"items": [asdict(item) for item in page], "next_cursor": next_cursor}
    )


@router.get(
    "/{action_id}",
    response_model=TaskActionView,
    summary="Show one bulk action",
    description="Its audit row, with its progress while it runs (`state: running`).",
    responses={
        404: {"model": Problem, "description": "No action has this id"},
        422: {"model": Problem, "description": "The id is not a positive whole number"},
        **_UNAVAILABLE,
    },
)
async def get_task_action(
    action_id: Annotated[int, Path(ge=1, le=2**63 - 1)], pool: Pool
) -> TaskActionView:
    found = await actions.get(pool, action_id)
    if found is None:
        raise HTTPException(404, f"no task action {action_id}")
    return TaskActionView.model_validate(asdict(found))
