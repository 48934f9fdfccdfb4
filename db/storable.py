"""What a payload must be to be stored: plain JSON that Postgres' jsonb can hold.

Python's JSON parser lets through values that are not JSON (NaN, Infinity) or that
jsonb and the encoder refuse (NUL characters, lone surrogates, integers past 64 bits).
Each is caught here with its location, so the client gets a 422 instead of a 500 or,
worse, a payload silently stored as something else.
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_DEPTH = 32
MAX_STRING = 65_536  # characters, the default of MAX_PAYLOAD_STRING
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what the JSON encoder can write
_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")


def unstorable_character(text: str) -> str | None:
    """The first character of ``text`` that Postgres text and jsonb refuse (a NUL, or a
    lone surrogate, which UTF-8 cannot encode), as "U+0000 at index 2"; None if none."""
    found = _UNSTORABLE_TEXT.search(text)
    if found is None:
        return None
    return f"U+{ord(found.group()):04X} at index {found.start()}"


class UnstorablePayload(ValueError):
    def __init__(self, loc: list[str | int], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def check_storable(
    value: Any,
    loc: list[str | int] | None = None,
    depth: int = 0,
    *,
    max_string: int = MAX_STRING,
) -> None:
    """Raise UnstorablePayload for the first value that is not storable JSON.

    Strings, values and keys alike, may be ``max_string`` characters long at most.
    """
    loc = loc if loc is not None else []
    if isinstance(value, str):
        if len(value) > max_string:
            raise UnstorablePayload(loc, f"string longer than {max_string} characters")
        if (found := unstorable_character(value)) is not None:
            raise UnstorablePayload(
                loc, f"text may not contain NUL characters or lone surrogates ({found})"
            )
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise UnstorablePayload(loc, "integer out of range (64 bits at most)")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UnstorablePayload(loc, "NaN and Infinity are not JSON numbers")
    elif isinstance(value, dict | list):
        if depth >= MAX_DEPTH:
            raise UnstorablePayload(loc, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if len(key) > max_string:
                    # The location is the object: a key that long makes a poor path part.
                    raise UnstorablePayload(loc, f"a key is longer than {max_string} characters")
                if (found := unstorable_character(key)) is not None:
                    raise UnstorablePayload(
                        [*loc, key],
                        f"keys may not contain NUL characters or lone surrogates ({found})",
                    )
                check_storable(item, [*loc, key], depth + 1, max_string=max_string)
        else:
            for index, item in enumerate(value):
                check_storable(item, [*loc, index], depth + 1, max_string=max_string)
    else:
        raise UnstorablePayload(loc, f"{type(value).__name__} is not a JSON value")
