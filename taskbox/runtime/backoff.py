"""Exponential backoff with jitter, for task retries and refused publishes."""

from __future__ import annotations

import random

DEFAULT_JITTER = 0.5


def backoff_delay(attempt: int, base: float, cap: float, jitter: float = DEFAULT_JITTER) -> float:
    """Seconds to wait before try ``attempt + 1`` after ``attempt`` failures (>= 1).

    Jitter (a uniform draw in the top ``jitter`` fraction of the exponential ceiling:
    0.5, the default, between half the ceiling and all of it; 0 the ceiling itself; 1
    anywhere below it) spreads retries of tasks that failed together, so they do not
    come back as a thundering herd.
    """
    # The exponent stops growing long before the cap matters; an unbounded one overflows
    # a float after ~1,000 attempts of a row the broker keeps refusing.
    ceiling = min(cap, base * 2 ** min(max(attempt - 1, 0), 60))
    return random.uniform(ceiling * (1 - jitter), ceiling)  # noqa: S311 - not cryptography
