"""Task context on log lines: bound per asyncio task, rendered as JSON keys or key=value."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from runtime.logs import JsonFormatter, TaskContextFilter, TextFormatter, bind_task, task_fields


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
