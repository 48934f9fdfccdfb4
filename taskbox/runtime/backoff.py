"""Exponential backoff with full jitter, for task retries and refused publishes."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before try ``attempt + 1`` after ``attempt`` failures (>= 1).

    Full jitter (a uniform draw below the exponential ceiling) spreads retries of tasks
    that failed together, so they do not come back as a thundering herd.
    """
    # The exponent stops growing long before the cap matters; an unbounded one overflows
    # a float after ~1,000 attempts of a row the broker keeps refusing.
    ceiling = min(cap, base * 2 ** min(max(attempt - 1, 0), 60))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography
