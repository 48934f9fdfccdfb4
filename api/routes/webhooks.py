"""/api/v1/webhooks (subscriptions, their deliveries) and /api/v1/webhook-deliveries
(one delivery with its attempts, replay). Routes parse, call the webhook service, shape."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status

from taskbox.api import rendering
from taskbox.api.routes.responses import NOT_JSON, TOO_LARGE
from taskbox.api.schemas import Problem
from taskbox.api.webhook_schemas import (
    Attempt,
    Delivery,
    DeliveryDetail,
    DeliveryPage,
    DeliveryStatus,
    ReplayedCount,
    TaskDeliveryList,
    Webhook,
    WebhookCreate,
    WebhookList,
    WebhookUpdate,
    WebhookWithSecret,
)
from taskbox.api.webhooks import WebhookService

Responses = dict[int | str, dict[str, Any]]

_UNAUTHORIZED: Responses = {
    401: {"model": Problem, "description": "The API key is missing or not valid"}
}
router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"], responses=_UNAUTHORIZED)
deliveries_router = APIRouter(
    prefix="/api/v1/webhook-deliveries", tags=["webhooks"], responses=_UNAUTHORIZED
)
task_deliveries_router = APIRouter(
    prefix="/api/v1/tasks", tags=["webhooks"], responses=_UNAUTHORIZED
)

_NOT_FOUND: Responses = {404: {"model": Problem, "description": "No webhook has this id"}}
_NO_DELIVERY: Responses = {404: {"model": Problem, "description": "No delivery has this id"}}
_INVALID: Responses = {
    422: {"model": Problem, "description": "The request is invalid; `errors` says where"}
}
_UNAVAILABLE: Responses = {503: {"model": Problem, "description": "The database is unreachable"}}


def _service(request: Request) -> WebhookService:
    service: WebhookService = request.app.state.webhooks
    return service


def _webhook(row: Mapping[str, Any]) -> dict[str, Any]:
    return {field: row[field] for field in Webhook.model_fields}


def _delivery(row: Mapping[str, Any]) -> Delivery:
    return Delivery(**{field: row[field] for field in Delivery.model_fields})


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookWithSecret,
    summary="Subscribe a URL to task outcomes",
    description=(
        "Each task that ends with one of `events` (and matches `task_types` and `queues` "
        "when given) is POSTed to `url` as a signed event (Standard Webhooks), retried "
        "with backoff until delivered or out of attempts. The answer holds the signing "
        "`secret`, shown only this once. The `Location` header points at the webhook."
    ),
    responses={**TOO_LARGE, **NOT_JSON, **_INVALID, **_UNAVAILABLE},
)
async def create_webhook(body: WebhookCreate, request: Request) -> Response:
    row, secret = await _service(request).create(body)
    document = WebhookWithSecret(**_webhook(row), secret=secret).model_dump(mode="json")
    return rendering.json_response(document, 201, {"Location": f"{router.prefix}/{row['id']}"})


@router.get(
    "",
    response_model=WebhookList,
    summary="List the webhooks",
    description="Every subscription, oldest first, without its secret.",
    responses=_UNAVAILABLE,
)
async def list_webhooks(request: Request) -> WebhookList:
    rows = await _service(request).list_all()
    return WebhookList(items=[Webhook(**_webhook(row)) for row in rows])


@router.get(
    "/{webhook_id:uuid}",
    response_model=Webhook,
    summary="Get a webhook",
    responses={**_NOT_FOUND, **_UNAVAILABLE},
)
async def get_webhook(webhook_id: uuid.UUID, request: Request) -> Webhook:
    return Webhook(**_webhook(await _service(request).get(webhook_id)))


@router.patch(
    "/{webhook_id:uuid}",
    response_model=Webhook,
    summary="Change a webhook",
    description=(
        "Only the fields given change. A new `url` is checked as at creation and applies "
        "to pending deliveries too; `enabled: false` stops new events from being queued "
        "(deliveries already queued are still sent)."
    ),
    responses={**_NOT_FOUND, **TOO_LARGE, **NOT_JSON, **_INVALID, **_UNAVAILABLE},
)
async def update_webhook(webhook_id: uuid.UUID, body: WebhookUpdate, request: Request) -> Webhook:
    return Webhook(**_webhook(await _service(request).update(webhook_id, body)))


@router.delete(
    "/{webhook_id:uuid}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a webhook",
    description="With its deliveries and their attempts; pending ones are not sent.",
    responses={**_NOT_FOUND, **_UNAVAILABLE},
)
async def delete_webhook(webhook_id: uuid.UUID, request: Request) -> Response:
    await _service(request).delete(webhook_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{webhook_id:uuid}/rotate-secret",
    response_model=WebhookWithSecret,
    summary="Rotate a webhook's secret",
    description=(
        "A new secret signs from now on, shown only in this answer; for "
        "WEBHOOK_ROTATION_GRACE (a day by default) the previous one signs too, so receivers "
        "can switch over without refusing a delivery."
    ),
    responses={**_NOT_FOUND, **_UNAVAILABLE},
)
async def rotate_secret(webhook_id: uuid.UUID, request: Request) -> WebhookWithSecret:
    row, secret = await _service(request).rotate_secret(webhook_id)
    return WebhookWithSecret(**_webhook(row), secret=secret)


@router.get(
    "/{webhook_id:uuid}/deliveries",
    response_model=DeliveryPage,
    summary="List a webhook's deliveries",
    responses={**_NOT_FOUND, **_INVALID, **_UNAVAILABLE},
)
async def list_deliveries(
    webhook_id: uuid.UUID,
    request: Request,
    status_: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
    ] = None,
) -> DeliveryPage:
    rows, next_cursor = await _service(request).deliveries(webhook_id, status_, limit, cursor)
    return DeliveryPage(items=[_delivery(row) for row in rows], next_cursor=next_cursor)


@router.post(
    "/{webhook_id:uuid}/replay-failed",
    response_model=ReplayedCount,
    summary="Replay a webhook's failed deliveries",
    description="Every failed delivery of the webhook becomes pending again, due now.",
    responses={**_NOT_FOUND, **_UNAVAILABLE},
)
async def replay_failed(webhook_id: uuid.UUID, request: Request) -> ReplayedCount:
    return ReplayedCount(replayed=await _service(request).replay_failed(webhook_id))


@deliveries_router.get(
    "/{delivery_id:uuid}",
    response_model=DeliveryDetail,
    summary="Get a delivery with its attempts",
    responses={**_NO_DELIVERY, **_UNAVAILABLE},
)
async def get_delivery(delivery_id: uuid.UUID, request: Request) -> DeliveryDetail:
    row, attempts = await _service(request).delivery(delivery_id)
    history = [Attempt(**{field: a[field] for field in Attempt.model_fields}) for a in attempts]
    return DeliveryDetail(**_delivery(row).model_dump(), body=row["body"], history=history)


@deliveries_router.post(
    "/{delivery_id:uuid}/replay",
    response_model=Delivery,
    summary="Replay a failed delivery",
    description=(
        "A failed delivery becomes pending again, due now, with a full budget of "
        "attempts; its earlier attempts stay in its history. A pending or delivered one "
        "answers 409."
    ),
    responses={
        409: {"model": Problem, "description": "The delivery is not failed"},
        **_NO_DELIVERY,
        **_UNAVAILABLE,
    },
)
async def replay_delivery(delivery_id: uuid.UUID, request: Request) -> Delivery:
    return _delivery(await _service(request).replay(delivery_id))


@task_deliveries_router.get(
    "/{task_id:uuid}/webhook-deliveries",
    response_model=TaskDeliveryList,
    summary="List a task's webhook deliveries",
    description=(
        "Every delivery of the task's outcome: to each matching subscription and to its "
        "own `callback_url` (`webhook_id` null), newest first."
    ),
    responses={
        404: {"model": Problem, "description": "No task has this id"},
        **_UNAVAILABLE,
    },
)
async def list_task_deliveries(task_id: uuid.UUID, request: Request) -> TaskDeliveryList:
    rows = await _service(request).task_deliveries(task_id)
    return TaskDeliveryList(items=[_delivery(row) for row in rows])
