"""Types of query parameters that need more than pydantic's defaults."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from pydantic import BeforeValidator

_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def _not_a_number(value: object) -> object:
    # pydantic reads a number as Unix seconds, so ?created_after=0.5 would quietly mean
    # 1970; the parameters are documented (and typed in OpenAPI) as ISO 8601 only.
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        raise ValueError("expected an ISO 8601 timestamp such as 2026-11-26T12:00:00Z")
    return value


IsoDatetime = Annotated[datetime, BeforeValidator(_not_a_number)]
