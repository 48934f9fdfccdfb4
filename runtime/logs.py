"""Logging setup: readable text by default, one JSON object a line with LOG_FORMAT=json.

Context fields (``task_id``, ``outbox_id``, ``attempt``, ``trace_id``) reach a line two
ways: ``extra=`` on the call, or ``bind_task`` for everything logged while one task
runs, including lines its handler logs itself. The API's ``request_id`` comes the same
way, from ``bind_request_id`` for everything logged while one request is served. Either
way they become JSON keys, or ``key=value`` pairs after a text line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else came in through ``extra=`` and is context.
# uvicorn adds color_message, an ANSI copy of the message.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}

# The fields of what the current asyncio task works on: a task in the consumer, a
# request in the api. Each asyncio task runs in its own copy of the context, so binding
# inside one never leaks into another.
_context: ContextVar[Mapping[str, Any] | None] = ContextVar("taskbox_log_context", default=None)


def bind_task(**fields: Any) -> Token[Mapping[str, Any] | None]:
    """Put ``fields`` on every line logged from here on in this asyncio task.

    Call it at the start of a coroutine that runs as its own asyncio task (its context
    is a copy), never in a long-lived loop, where it would stick to later tasks' lines;
    or hand the token to ``unbind`` when the work is done.
    """
    return _context.set({k: v for k, v in fields.items() if v is not None})


def bind_request_id(request_id: str) -> Token[Mapping[str, Any] | None]:
    """``request_id`` on every line logged until ``unbind(token)``: requests served
    in-process (tests, ASGI transports) share one asyncio task, so it must come off."""
    return bind_task(request_id=request_id)


def unbind(token: Token[Mapping[str, Any] | None]) -> None:
    _context.reset(token)


def task_fields(**fields: Any) -> dict[str, Any]:
    """``extra=`` for a line about a task: the given fields without the missing ones."""
    return {k: v for k, v in fields.items() if v is not None}


class TaskContextFilter(logging.Filter):
    """Adds the bound fields (a task's, or a request's id) to records that do not
    carry them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        if context:
            for key, value in context.items():
                record.__dict__.setdefault(key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if context:
            line += " " + " ".join(f"{k}={v}" for k, v in context.items())
        return line


def configure(level: str = "INFO", fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TaskContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiormq logs every reconnect attempt at ERROR with a traceback; ours say it better.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
