"""Moments a client sends, in a query parameter or a body: ISO 8601 text only."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BeforeValidator

_EXAMPLE = "e.g. 2026-12-24T18:00:00Z"


def _iso_8601(value: object) -> object:
    """Text through ``datetime.fromisoformat``, before pydantic sees the value.

    Left to pydantic, a number (or numeric text) is read as Unix seconds, so
    ?created_after=0.5 would quietly mean 1970; and a strict body model takes no text
    for a datetime at all (FastAPI validates a body as Python objects).
    """
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 timestamp, {_EXAMPLE}")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value[:40]!r} is not an ISO 8601 timestamp, {_EXAMPLE}") from None


IsoDatetime = Annotated[datetime, BeforeValidator(_iso_8601)]
