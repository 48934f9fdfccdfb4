"""Taskbox queue names: what a name may be, and the AMQP queue each one maps to.

A Taskbox queue is a routing target: every task belongs to one (``tasks.queue``), every
consumer serves some. Names enter from a task type's registration, a create request and
``CONSUMER_QUEUES``, and are checked here with the same rule everywhere: they end up in
AMQP queue names, metric labels and log lines, so they stay short and plain.
"""

from __future__ import annotations

import re

DEFAULT_QUEUE = "default"
MAX_QUEUE_NAME = 64
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
RULE = (
    f"1 to {MAX_QUEUE_NAME} characters: lowercase letters, digits, '-' and '_', "
    "starting with a letter or a digit"
)


class InvalidQueueName(ValueError):
    pass


def check_queue_name(name: object) -> str:
    """``name`` when it is a valid queue name; else InvalidQueueName saying why."""
    if not isinstance(name, str):
        raise InvalidQueueName(f"a queue name must be a string, not {type(name).__name__}")
    if not name or len(name) > MAX_QUEUE_NAME or _NAME.fullmatch(name) is None:
        raise InvalidQueueName(f"invalid queue name {name!r}: {RULE}")
    return name


MAX_REASON = 500


def check_reason(text: str) -> str:
    """The reason for a pause or resume, stripped; ValueError saying what is wrong.

    It is printed in ``taskbox status`` and in logs: one line of printable text, so that
    it cannot forge lines of its own."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("a reason is required: say why, for the audit trail")
    if len(stripped) > MAX_REASON:
        raise ValueError(f"a reason is at most {MAX_REASON} characters; got {len(stripped)}")
    if any(not char.isprintable() for char in stripped):
        raise ValueError("a reason is one line of printable text (no control characters)")
    return stripped


def amqp_queue_name(base: str, queue: str) -> str:
    """The AMQP queue (and routing key) of Taskbox queue ``queue``: QUEUE_NAME itself for
    ``default``, so that a deployment from before named queues keeps its queue and its
    messages; ``<QUEUE_NAME>.<queue>`` for any other."""
    return base if queue == DEFAULT_QUEUE else f"{base}.{queue}"


# A consumer records that it serves its queues every PRESENCE_INTERVAL seconds; a queue
# counts the consumers recorded within PRESENCE_WINDOW (a few intervals, so that one
# missed write does not make a served queue look abandoned).
PRESENCE_INTERVAL = 15.0
PRESENCE_WINDOW = 60.0
# A consumer's row that long unrefreshed is a consumer gone (every restart is a new
# one): the relay's housekeeping deletes it, and a queue nothing else uses then leaves
# the listing.
PRESENCE_KEPT = 86400.0
