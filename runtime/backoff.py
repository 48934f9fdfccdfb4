"""Exponential backoff with full jitter, for task retries and refused publishes."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before try ``attempt + 1`` after ``attempt`` failures (>= 1).

    Full jitter (a uniform draw below the exponential ceiling) spreads retries of tasks
    that failed together, so they do not come back as a thundering herd.
    """
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography
