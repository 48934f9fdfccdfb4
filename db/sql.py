"""Building a statement from fixed fragments, its values passed as parameters."""

from __future__ import annotations

from typing import Any


class Parameters:
    """The values of a statement under construction.

    Each call adds a value and returns its placeholder (``$1``, ``$2``, ...), so filters
    can be assembled from constant SQL fragments while nothing a client sends is ever
    spliced into the statement text.
    """

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"
