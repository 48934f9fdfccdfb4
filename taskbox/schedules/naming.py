"""What a schedule may be called: one path segment of /api/v1/schedules/{name}."""

from __future__ import annotations

import re

SCHEDULE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_NAME = re.compile(SCHEDULE_NAME_PATTERN)


def check_schedule_name(name: str) -> None:
    """ValueError unless ``name`` is 1-128 of letters, digits and ``. _ : -``,
    starting with a letter or digit."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"schedule name {name!r}: 1-128 letters, digits and . _ : -, "
            "starting with a letter or digit"
        )
