"""Opaque keyset cursors: the (created_at, id) of the last task on the previous page."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime

import orjson

from taskbox.api.params import out_of_range


class InvalidCursor(ValueError):
    pass


_NOT_OURS = "cursor is not one this API issued; use next_cursor as given"


def encode(created_at: datetime, task_id: uuid.UUID) -> str:
    raw = orjson.dumps([created_at.isoformat(), str(task_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, task_id = orjson.loads(raw)
        if not isinstance(created_at, str) or not isinstance(task_id, str):
            raise TypeError("cursor fields must be strings")
        position = datetime.fromisoformat(created_at), uuid.UUID(task_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidCursor(_NOT_OURS) from exc
    # A cursor we issued holds a created_at Postgres gave us: aware, and in range.
    if position[0].tzinfo is None or out_of_range(position[0]) is not None:
        raise InvalidCursor(_NOT_OURS)
    return position


# Task actions page on their id alone (newest first): the same opaque shape.
def encode_id(action_id: int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(["id", action_id])).decode().rstrip("=")


def decode_id(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        tag, action_id = orjson.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidCursor(_NOT_OURS) from exc
    if tag != "id" or type(action_id) is not int or not 1 <= action_id < 2**63:
        raise InvalidCursor(_NOT_OURS)
    return action_id
