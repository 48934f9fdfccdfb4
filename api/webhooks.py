"""The webhook service: what /api/v1/webhooks and /api/v1/webhook-deliveries ask for.

A destination is checked as the delivery worker will check it (taskbox.webhooks:
the URL's form, then every address its host resolves to), so a subscription or a
callback_url that could never be delivered is a 422 now rather than a failed delivery
later. Secrets are made here, returned once, and never logged.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from taskbox.api import pagination
from taskbox.api.service import InvalidRequest, TaskNotFound
from taskbox.api.webhook_schemas import WebhookCreate, WebhookUpdate
from taskbox.db import webhooks as store
from taskbox.db.webhooks import DeliveryStatus, Subscription
from taskbox.runtime.queues import InvalidQueueName, check_queue_name
from taskbox.tasktypes import TaskRegistry
from taskbox.webhooks import (
    AllowList,
    InvalidWebhookUrl,
    UnsafeDestination,
    check_url,
    new_secret,
    resolve_destination,
)

Row = Mapping[str, Any]


class WebhookNotFound(LookupError):
    def __init__(self, webhook_id: uuid.UUID) -> None:
        super().__init__(f"webhook {webhook_id} does not exist")


class DeliveryNotFound(LookupError):
    def __init__(self, delivery_id: uuid.UUID) -> None:
        super().__init__(f"webhook delivery {delivery_id} does not exist")


class NotReplayable(Exception):
    def __init__(self, delivery_id: uuid.UUID, status: str) -> None:
        super().__init__(
            f"webhook delivery {delivery_id} is {status}; only a failed delivery is replayed"
        )


async def check_destination(url: str, allow: AllowList, loc: list[str | int]) -> str:
    """``url`` if webhooks may be sent there; else InvalidRequest at ``loc`` saying why."""
    try:
        target = check_url(url)
    except InvalidWebhookUrl as exc:
        raise InvalidRequest.at(loc, str(exc), "invalid_url") from None
    try:
        await resolve_destination(target, allow)
    except UnsafeDestination as exc:
        raise InvalidRequest.at(loc, str(exc), "unsafe_destination") from None
    return url


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


class WebhookService:
    def __init__(
        self, pool: asyncpg.Pool, registry: TaskRegistry, allow: AllowList, secret_grace: float
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._allow = allow
        self._grace = secret_grace

    def _task_types(self, values: Sequence[str] | None) -> list[str] | None:
        if values is None:
            return None
        for index, name in enumerate(values):
            if self._registry.get(name) is None:
                known = ", ".join(self._registry.names()) or "none"
                raise InvalidRequest.at(
                    ["body", "task_types", index],
                    f"unknown task type {name!r}; registered: {known}",
                    "unknown_task_type",
                )
        return _unique(values)

    @staticmethod
    def _queues(values: Sequence[str] | None) -> list[str] | None:
        if values is None:
            return None
        for index, name in enumerate(values):
            try:
                check_queue_name(name)
            except InvalidQueueName as exc:
                raise InvalidRequest.at(
                    ["body", "queues", index], str(exc), "invalid_queue"
                ) from None
        return _unique(values)

    async def create(self, request: WebhookCreate) -> tuple[Row, str]:
        """The subscription and its secret (to be shown this once)."""
        subscription = Subscription(
            url=await check_destination(request.url, self._allow, ["body", "url"]),
            events=_unique(request.events),
            task_types=self._task_types(request.task_types),
            queues=self._queues(request.queues),
            enabled=request.enabled,
        )
        secret = new_secret()
        return await store.create_webhook(self._pool, subscription, secret), secret

    async def list_all(self) -> list[Row]:
        return list(await store.list_webhooks(self._pool))

    async def get(self, webhook_id: uuid.UUID) -> Row:
        row: Row | None = await store.get_webhook(self._pool, webhook_id)
        if row is None:
            raise WebhookNotFound(webhook_id)
        return row

    async def update(self, webhook_id: uuid.UUID, request: WebhookUpdate) -> Row:
        given = request.model_fields_set
        for field in ("url", "events", "enabled"):
            if field in given and getattr(request, field) is None:
                raise InvalidRequest.at(
                    ["body", field], f"{field} cannot be null; leave it out to keep it", "null"
                )
        changes: dict[str, Any] = {}
        if "url" in given and request.url is not None:
            changes["url"] = await check_destination(request.url, self._allow, ["body", "url"])
        if "events" in given and request.events is not None:
            changes["events"] = _unique(request.events)
        if "task_types" in given:
            changes["task_types"] = self._task_types(request.task_types)
        if "queues" in given:
            changes["queues"] = self._queues(request.queues)
        if "enabled" in given:
            changes["enabled"] = request.enabled
        row: Row | None = await store.update_webhook(self._pool, webhook_id, changes)
        if row is None:
            raise WebhookNotFound(webhook_id)
        return row

    async def delete(self, webhook_id: uuid.UUID) -> None:
        if not await store.delete_webhook(self._pool, webhook_id):
            raise WebhookNotFound(webhook_id)

    async def rotate_secret(self, webhook_id: uuid.UUID) -> tuple[Row, str]:
        secret = new_secret()
        row: Row | None = await store.rotate_secret(self._pool, webhook_id, secret, self._grace)
        if row is None:
            raise WebhookNotFound(webhook_id)
        return row, secret

    async def deliveries(
        self,
        webhook_id: uuid.UUID,
        status: DeliveryStatus | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[Row], str | None]:
        before: tuple[datetime, uuid.UUID] | None = None
        if cursor is not None:
            try:
                before = pagination.decode(cursor)
            except pagination.InvalidCursor as exc:
                raise InvalidRequest.at(["query", "cursor"], str(exc), "invalid_cursor") from None
        await self.get(webhook_id)  # a 404 for a subscription that does not exist
        rows = await store.list_deliveries(self._pool, webhook_id, status, limit + 1, before)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = pagination.encode(rows[-1]["created_at"], rows[-1]["id"]) if more else None
        return list(rows), next_cursor

    async def task_deliveries(self, task_id: uuid.UUID) -> list[Row]:
        rows: list[Row] | None = await store.task_deliveries(self._pool, task_id)
        if rows is None:
            raise TaskNotFound(task_id)
        return rows

    async def delivery(self, delivery_id: uuid.UUID) -> tuple[Row, list[Row]]:
        found = await store.get_delivery(self._pool, delivery_id)
        if found is None:
            raise DeliveryNotFound(delivery_id)
        row, attempts = found
        return row, list(attempts)

    async def replay(self, delivery_id: uuid.UUID) -> Row:
        replayed: Row | None = await store.replay_delivery(self._pool, delivery_id)
        if replayed is not None:
            return replayed
        row, _ = await self.delivery(delivery_id)
        raise NotReplayable(delivery_id, row["status"])

    async def replay_failed(self, webhook_id: uuid.UUID) -> int:
        await self.get(webhook_id)
        return await store.replay_failed(self._pool, webhook_id)
