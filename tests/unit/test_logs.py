"""Log lines: task context bound per asyncio task, rendered as JSON keys or key=value;
text lines a client cannot forge (control characters escaped)."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Iterator

import orjson
import pytest

from taskbox.runtime.logs import (
    JsonFormatter,
    TaskContextFilter,
    TextFormatter,
    bind_task,
    task_fields,
)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TaskContextFilter())
    logger = logging.getLogger("test.task_context")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


async def test_bound_fields_reach_every_line_of_that_task_only(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, _ = captured

    async def run(task_id: str, attempt: int) -> None:
        bind_task(task_id=task_id, outbox_id=attempt * 10, attempt=attempt, trace_id=None)
        await asyncio.sleep(0)
        logger.info("handler says hi")  # a handler's own line, no extra=

    await asyncio.gather(run("a", 1), run("b", 2))
    logger.info("outside any task")
    logger.info("explicit", extra=task_fields(task_id="c", attempt=None))

    first, second, outside, explicit = lines(stream)
    assert {k: first[k] for k in ("task_id", "outbox_id", "attempt")} == {
        "task_id": "a",
        "outbox_id": 10,
        "attempt": 1,
    }
    assert (second["task_id"], second["attempt"]) == ("b", 2)
    assert "trace_id" not in first  # missing fields are left out, not null
    assert "task_id" not in outside
    assert explicit["task_id"] == "c"
    assert "attempt" not in explicit


async def test_explicit_extra_wins_over_the_bound_context(
    captured: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, stream, handler = captured

    async def run() -> None:
        bind_task(task_id="bound", attempt=1)
        logger.info("x", extra={"attempt": 2})

    await asyncio.create_task(run())
    (line,) = lines(stream)
    assert (line["task_id"], line["attempt"]) == ("bound", 2)

    handler.setFormatter(TextFormatter())

    async def text() -> None:
        bind_task(task_id="t1", trace_id="abc")
        logger.info("plain")

    await asyncio.create_task(text())
    assert stream.getvalue().splitlines()[-1].endswith("plain task_id=t1 trace_id=abc")


# -- text lines cannot be forged --------------------------------------------------------

FORGED = "2026-01-01 00:00:00,000 CRITICAL consumer.worker: attempt committed: DONE"


def text_lines(record: logging.LogRecord) -> list[str]:
    return TextFormatter().format(record).splitlines()


@pytest.mark.parametrize(
    "breaker", ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x85", "\u2028", "\u2029"]
)
def test_a_text_line_is_one_line_whatever_the_message_and_fields_hold(breaker: str) -> None:
    record = logging.makeLogRecord(
        {
            "name": "taskbox.consumer.attempt",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "attempt failed, no attempts left: %s",
            "args": (f"drill{breaker}{FORGED}",),
            # a field a client can fill, e.g. a handler's own extra=
            "task_id": f"t1{breaker}{FORGED} task_id=forged",
        }
    )
    (line,) = text_lines(record)
    assert FORGED in line  # shown, escaped, not dropped
    assert line.endswith(
        f"task_id=t1{breaker.encode('unicode_escape').decode()}{FORGED} task_id=forged"
    )


def test_control_characters_are_shown_as_escapes_and_the_rest_is_untouched() -> None:
    record = logging.makeLogRecord(
        {"msg": "a\tb\x00c\x1b[31md\x7fe\x9bf\u2028g é ü 任务 \\n", "levelname": "INFO"}
    )
    (line,) = text_lines(record)
    assert line.endswith(": a\\tb\\x00c\\x1b[31md\\x7fe\\x9bf\\u2028g é ü 任务 \\n")


def test_a_traceback_stays_on_its_records_line() -> None:
    try:
        raise ValueError(f"bad\n{FORGED}")
    except ValueError:
        record = logging.makeLogRecord({"msg": "handler crashed", "exc_info": sys.exc_info()})
    (line,) = text_lines(record)
    assert "handler crashed\\nTraceback (most recent call last):\\n" in line
    assert f"ValueError: bad\\n{FORGED}" in line
