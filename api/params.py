"""Values a client sends, in a query parameter or a body, checked before they reach Postgres.

Moments are ISO 8601 text only, and must be ones asyncpg can send; text may hold no
character that Postgres refuses.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

from taskbox.db.storable import unstorable_character

_EXAMPLE = "e.g. 2026-12-24T18:00:00Z"


# The range a moment must lie in, once in UTC. Python's datetimes end at years 1 and
# 9999, and asyncpg sends their first and last microsecond as -infinity and infinity
# (reading those back as datetimes without an offset), so both ends are left out.
EARLIEST = datetime.min.replace(tzinfo=UTC) + timedelta(microseconds=1)
LATEST = datetime.max.replace(tzinfo=UTC) - timedelta(microseconds=1)


def _z(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def out_of_range(moment: datetime) -> str | None:
    """Why ``moment`` cannot be sent to Postgres as itself, or None when it can.

    asyncpg converts a timestamptz to UTC before sending it: year 1 at +14:00 is year 0
    in UTC, and the conversion raises OverflowError (Postgres itself would take it). A
    moment without an offset is read as UTC.
    """
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    try:
        in_utc = aware.astimezone(UTC)
    except OverflowError:
        too_early = (aware.utcoffset() or timedelta(0)) > timedelta(0)
    else:
        if EARLIEST <= in_utc <= LATEST:
            return None
        too_early = in_utc < EARLIEST
    if too_early:
        return f"in UTC it falls before {_z(EARLIEST)}, the earliest moment accepted"
    return f"in UTC it falls after {_z(LATEST)}, the latest moment accepted"


def _iso_8601(value: object) -> object:
    """Text through ``datetime.fromisoformat``, before pydantic sees the value.

    Left to pydantic, a number (or numeric text) is read as Unix seconds, so
    ?created_after=0.5 would quietly mean 1970; and a strict body model takes no text
    for a datetime at all (FastAPI validates a body as Python objects).
    """
    if isinstance(value, datetime):
        moment, text = value, value.isoformat()
    elif isinstance(value, str):
        try:
            moment, text = datetime.fromisoformat(value), value
        except ValueError:
            raise ValueError(f"{value[:40]!r} is not an ISO 8601 timestamp, {_EXAMPLE}") from None
    else:
        raise ValueError(f"expected an ISO 8601 timestamp, {_EXAMPLE}")
    problem = out_of_range(moment)
    if problem is not None:
        raise ValueError(f"{text[:40]!r} is out of range: {problem}")
    return moment


IsoDatetime = Annotated[datetime, BeforeValidator(_iso_8601)]


def _storable(text: str) -> str:
    # Postgres refuses a NUL in text with an error of its own (a 500 here, not the
    # client's 422); a lone surrogate cannot even be encoded to send. A query string
    # cannot carry one (it is decoded with replacement), but a caller other than
    # FastAPI's query parser could.
    found = unstorable_character(text)
    if found is not None:
        raise ValueError(f"text may not contain NUL characters or lone surrogates ({found})")
    return text


StorableText = Annotated[str, AfterValidator(_storable)]
