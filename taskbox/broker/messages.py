"""The task message: what the relay publishes and the consumer parses.

The body names the task; everything else (payload, attempts) is read from Postgres at
claim time, so a message can never carry a stale copy of the task.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
from pamqp.commands import Basic
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONTENT_TYPE = "application/json"
PERSISTENT = 2  # AMQP delivery mode: written to disk by a durable queue


class TaskMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    task_id: uuid.UUID
    type: str
    # An outbox id is a bigint: one out of its range could not even be sent in a claim.
    outbox_id: int = Field(ge=1, le=2**63 - 1)
    kind: str = "task.created"


class MalformedMessage(ValueError):
    """The message cannot be turned into a TaskMessage; it belongs in the dead letters."""


class Encoded(NamedTuple):
    body: bytes
    properties: Basic.Properties


def encode(*, outbox_id: int, kind: str, body: dict[str, Any], headers: dict[str, Any]) -> Encoded:
    """The message's body and AMQP properties, as the relay hands them to aiormq.

    The relay publishes through aiormq's channel rather than aio-pika's Message and
    Exchange, which convert every message's fields once more: that costs a fifth to a
    quarter more CPU per confirmed publish (bench/BASELINE.md).
    """
    document = {
        "task_id": body["task_id"],
        "type": body["type"],
        "outbox_id": outbox_id,
        "kind": kind,
    }
    return Encoded(
        orjson.dumps(document),
        Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=str(outbox_id),
            message_type=kind,
            priority=int(body.get("priority", 0)),
            timestamp=datetime.now(UTC),
            headers=headers or None,
        ),
    )


def parse(body: bytes) -> TaskMessage:
    try:
        return TaskMessage.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise MalformedMessage(f"{where}: {first['msg']}") from None
