"""The replay command line: what it accepts, and what it tells the operator to fix."""

from __future__ import annotations

import argparse
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from taskbox.db.states import TaskStatus
from taskbox.relay.__main__ import main
from taskbox.relay.replay import parse_moment, parse_outbox_range, parse_statuses, parse_task_id


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1200..1350", (1200, 1350)),
        ("7", (7, 7)),
        ("5..5", (5, 5)),
        ("100..", (100, 2**63 - 1)),
        ("..100", (1, 100)),
        (" 3..4 ", (3, 4)),
    ],
)
def test_outbox_range(text: str, expected: tuple[int, int]) -> None:
    assert parse_outbox_range(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("5..2", "FROM is above TO; swap them"),
        ("a..b", "wants FROM..TO"),
        ("1-5", "wants FROM..TO"),
        ("0..5", "outbox ids start at 1"),
        ("", "wants FROM..TO"),
        ("..", "wants FROM..TO"),
        ("1..2..3", "wants FROM..TO"),
    ],
)
def test_bad_outbox_range_says_what_to_fix(text: str, why: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        parse_outbox_range(text)


NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-04-30T10:30:00", datetime(2024, 4, 30, 10, 30, tzinfo=UTC)),  # naive: UTC
        ("2024-04-30", datetime(2024, 4, 30, tzinfo=UTC)),
        (
            "2024-04-30T10:30+02:00",
            datetime(2024, 4, 30, 10, 30, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("2h", NOW - timedelta(hours=2)),
        ("1d12h", NOW - timedelta(hours=36)),
    ],
)
def test_moments(text: str, expected: datetime) -> None:
    assert parse_moment(text, NOW) == expected


def test_bad_moment_says_what_is_accepted() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"neither a time .* nor a duration ago"):
        parse_moment("yesterday", NOW)


def test_statuses_any_case_and_comma_separated() -> None:
    assert parse_statuses("pending, FAILED") == [TaskStatus.PENDING, TaskStatus.FAILED]
    with pytest.raises(argparse.ArgumentTypeError, match="'LOST' is not a task status; one of"):
        parse_statuses("PENDING,LOST")
    with pytest.raises(argparse.ArgumentTypeError, match="needs a status"):
        parse_statuses(" , ")


def test_task_id() -> None:
    task_id = uuid.uuid4()
    assert parse_task_id(str(task_id)) == task_id
    with pytest.raises(argparse.ArgumentTypeError, match="is not a task id"):
        parse_task_id("42")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--reason", "x"], "choose what to replay"),
        (["--status", "FAILED"], '--reason "TEXT" is required'),
        (["--status", "FAILED", "--reason", "  "], '--reason "TEXT" is required'),
        (["--outbox-id", "9..3", "--dry-run"], "argument --outbox-id: .*swap them"),
        (["--stale-for", "10 minutes", "--dry-run"], "argument --stale-for: .*not a duration"),
        (["--stale-for", "0s", "--dry-run"], "--stale-for must be longer than 0"),
        (["--status", "DONE", "--limit", "0", "--dry-run"], "argument --limit: want a whole"),
        (["--since", "2h", "--until", "3h", "--dry-run"], "--since must be earlier than --until"),
        (["--type", "echo", "--dry-run", "--chunk-size", "x"], "argument --chunk-size"),
    ],
)
def test_command_line_mistakes_exit_2_with_what_to_fix(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["replay", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m taskbox.relay replay" in err
    assert re.search(message, err), err
