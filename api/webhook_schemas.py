"""Request and response bodies of /api/v1/webhooks and /api/v1/webhook-deliveries."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from taskbox.runtime.queues import MAX_QUEUE_NAME
from taskbox.webhooks.destinations import MAX_URL

Event = Literal["task.done", "task.failed", "task.cancelled"]
DeliveryStatus = Literal["pending", "delivered", "failed"]
MAX_FILTER = 50

Url = Annotated[str, Field(min_length=1, max_length=MAX_URL)]
Events = Annotated[list[Event], Field(min_length=1, max_length=3)]
TaskTypes = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=200)]],
    Field(min_length=1, max_length=MAX_FILTER),
]
Queues = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_QUEUE_NAME)]],
    Field(min_length=1, max_length=MAX_FILTER),
]

_URL = (
    "http(s) URL the events are POSTed to. Its host must resolve to global addresses "
    "only (not loopback, private, link-local, CGNAT, multicast or reserved ones) unless "
    "WEBHOOK_ALLOWED_HOSTS names it; no user name, password or fragment."
)
_TYPES = "Only tasks of these types; null or absent: every type."
_QUEUES = "Only tasks of these queues; null or absent: every queue."


class WebhookCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"url": "https://example.com/hooks/taskbox", "events": ["task.done"]},
                {
                    "url": "https://example.com/hooks/failures",
                    "events": ["task.failed", "task.cancelled"],
                    "task_types": ["sha256"],
                    "queues": ["default"],
                },
            ]
        },
    )

    url: Url = Field(description=_URL)
    events: Events = Field(
        description="Which outcomes to send: task.done, task.failed, task.cancelled."
    )
    task_types: TaskTypes | None = Field(None, description=_TYPES)
    queues: Queues | None = Field(None, description=_QUEUES)
    enabled: bool = Field(True, description="false: no events are queued for it until enabled.")


class WebhookUpdate(BaseModel):
    """Only the fields given change; `url`, `events` and `enabled` cannot be null."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: Url | SkipJsonSchema[None] = Field(None, description=_URL)
    events: Events | SkipJsonSchema[None] = None
    task_types: TaskTypes | None = Field(None, description=_TYPES)
    queues: Queues | None = Field(None, description=_QUEUES)
    enabled: bool | SkipJsonSchema[None] = None


class Webhook(BaseModel):
    """A subscription; its secret is shown only when made or rotated."""

    id: uuid.UUID
    url: str
    events: list[Event]
    task_types: list[str] | None
    queues: list[str] | None
    enabled: bool
    created_at: datetime
    updated_at: datetime
    previous_secret_expires_at: datetime | None = Field(
        description="After a rotation: until when deliveries are signed with the previous "
        "secret too."
    )


class WebhookWithSecret(Webhook):
    secret: str = Field(
        description="whsec_<base64>: the key receivers verify signatures with (Standard "
        "Webhooks). Shown only in this answer; keep it."
    )


class WebhookList(BaseModel):
    items: list[Webhook]


class Delivery(BaseModel):
    """One event on its way to one URL: a row of the webhook outbox."""

    id: uuid.UUID = Field(description="Also the `webhook-id` header: the same on each retry.")
    webhook_id: uuid.UUID | None = Field(description="null: the task's own callback_url.")
    url: str
    task_id: uuid.UUID
    event: Event
    status: DeliveryStatus
    attempts: int = Field(description="Attempts so far (since the last replay).")
    next_attempt_at: datetime = Field(description="When a pending delivery is tried next.")
    created_at: datetime
    delivered_at: datetime | None


class TaskDeliveryList(BaseModel):
    items: list[Delivery] = Field(
        description="Newest first: one per matching subscription, and the callback's."
    )


class DeliveryPage(BaseModel):
    items: list[Delivery] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


class Attempt(BaseModel):
    attempt: int = Field(description="Its number; counting restarts after a replay.")
    at: datetime
    status_code: int | None = Field(description="The receiver's status; null: no answer.")
    latency_ms: float
    error: str | None = Field(description="Why the attempt did not deliver.")
    response_body: str | None = Field(
        description="The first bytes (at most 1 KiB) of the receiver's answer."
    )


class DeliveryDetail(Delivery):
    body: dict[str, Any] = Field(description="The event document, as sent.")
    history: list[Attempt] = Field(description="Every attempt, oldest first.")


class ReplayedCount(BaseModel):
    replayed: int = Field(description="Failed deliveries made pending again.")
