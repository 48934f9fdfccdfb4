"""Logging setup: readable text by default, one JSON object a line with LOG_FORMAT=json.

Context fields (``task_id``, ``outbox_id``, ``attempt``, ``trace_id``) reach a line two
ways: ``extra=`` on the call, or ``bind_task`` for everything logged while one task
runs, including lines its handler logs itself. The API's ``request_id`` comes the same
way, from ``bind_request_id`` for everything logged while one request is served. Either
way they become JSON keys, or ``key=value`` pairs after a text line.

A record is one line whatever a client put in it (a task's error message, a handler's
fields, a header uvicorn logs), so no one can forge a line that looks like ours: the
JSON encoder escapes C0 (newlines included) in its strings, and the text format shows
every control character as an escape (``\\n``, ``\\x1b``, ``\\u2028``), tracebacks too.
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


# Every character that ends a line for some reader (str.splitlines, a terminal, an
# editor) or steers a terminal: C0, DEL, C1, and the Unicode line and paragraph
# separators. Written as Python writes them in a string literal.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """``text`` with its control characters escaped: it prints as a single line."""
    # None of the escaped characters is printable: most lines are returned as they are.
    return text if text.isprintable() else text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value...``, one line a record.

    The whole line is escaped, not a chosen part: the message's arguments, the fields,
    a traceback and uvicorn's access log (a client's path and headers) all end up
    here, from any logger.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        if context:
            line += " " + " ".join(f"{k}={v}" for k, v in context.items())
        return one_line(line)


def configure(level: str = "INFO", fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TaskContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiormq logs every reconnect attempt at ERROR with a traceback; ours say it better.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
