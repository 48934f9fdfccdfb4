"""Durations as operators write them, on the command line and in settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from taskbox.relay.settings import RelaySettings
from taskbox.runtime.durations import InvalidDuration, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("1.5", 1.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("1w", 604800.0),
        ("1h30m", 5400.0),
        ("1d12h", 129600.0),
        (" 10M ", 600.0),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "m", "10x", "10 m", "ten minutes", "-5", "-5m", "1h-30m", "inf", "nan", "5m3"]
)
def test_parse_duration_refuses_with_a_hint(text: str) -> None:
    with pytest.raises(InvalidDuration, match="is not a duration: use a number with a unit"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.04, "0.0s"), (4.25, "4.2s"), (42, "42s"), (185, "3m5s"), (7200, "2h"), (604800, "7d")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_duration_reads_back_at_two_units() -> None:
    for seconds in (60, 3600, 86400, 90000, 5400):
        assert parse_duration(format_duration(seconds)) == seconds
    assert format_duration(90061) == "1d1h"  # two units are enough to read at a glance


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OUTBOX_RETENTION", "TASK_RETENTION", "RETENTION_INTERVAL", "RETENTION_BATCH"):
        monkeypatch.delenv(name, raising=False)


def test_retention_settings_defaults() -> None:
    settings = RelaySettings(_env_file=None)
    assert settings.outbox_retention == 7 * 86400
    assert settings.task_retention is None
    assert settings.retention_interval == 60
    assert settings.retention_batch == 1000


def test_retention_settings_read_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_RETENTION", "36h")
    monkeypatch.setenv("TASK_RETENTION", "30d")
    monkeypatch.setenv("RETENTION_INTERVAL", "5m")
    settings = RelaySettings(_env_file=None)
    assert (settings.outbox_retention, settings.task_retention) == (129600, 2592000)
    assert settings.retention_interval == 300


@pytest.mark.parametrize("off", ["", "none", "off", "Never"])
def test_task_retention_can_be_switched_off(monkeypatch: pytest.MonkeyPatch, off: str) -> None:
    monkeypatch.setenv("TASK_RETENTION", off)
    assert RelaySettings(_env_file=None).task_retention is None


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("OUTBOX_RETENTION", "7x", "is not a duration"),
        ("OUTBOX_RETENTION", "0", "greater than 0"),
        ("TASK_RETENTION", "0s", "greater than 0"),
        ("RETENTION_BATCH", "0", "greater than or equal to 1"),
    ],
)
def test_bad_retention_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        RelaySettings(_env_file=None)
