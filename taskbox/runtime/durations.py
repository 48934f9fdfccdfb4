"""Durations as operators write them: ``30s``, ``10m``, ``1h30m``, ``7d``.

One parser for the command line (``replay --stale-for 10m``) and for the settings
(``OUTBOX_RETENTION=7d``), so both accept the same spellings and refuse the same
mistakes with the same message.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_HINT = "use a number with a unit: 500ms, 30s, 10m, 2h, 7d, 1w, or combined like 1h30m"

# Words that switch an optional duration setting off.
OFF = frozenset({"", "none", "off", "never"})


class InvalidDuration(ValueError):
    pass


def parse_duration(text: str) -> float:
    """Seconds in ``text``; a bare number is seconds. Raises InvalidDuration."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = _PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise InvalidDuration(f"{text!r} is not a duration: {_HINT}") from None
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    if seconds != seconds or seconds < 0 or seconds == float("inf"):  # NaN, negative, inf
        raise InvalidDuration(f"{text!r} is not a duration: {_HINT}")
    return seconds


def format_duration(seconds: float) -> str:
    """A short human form that parse_duration reads back: ``4.2s``, ``42s``, ``3m5s``,
    ``2h``, ``7d``, ``1d6h`` (rounded to whole seconds past ten seconds)."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    rest = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    # Two units are enough to read an age at a glance.
    return "".join(parts[:2])


def _duration(value: object) -> object:
    return parse_duration(value) if isinstance(value, str) else value


def _optional_duration(value: object) -> object:
    if isinstance(value, str):
        return None if value.strip().lower() in OFF else parse_duration(value)
    return value


# Settings fields: ``Duration`` is seconds (a float) from a number or a duration text;
# ``OptionalDuration`` is also None when set to "", none, off or never.
Duration = Annotated[float, BeforeValidator(_duration)]
OptionalDuration = Annotated[float | None, BeforeValidator(_optional_duration)]
