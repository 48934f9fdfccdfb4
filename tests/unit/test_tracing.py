"""W3C traceparent: what the API accepts, continues or replaces."""

from __future__ import annotations

import re

import pytest

from taskbox.runtime import tracing

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
FORMAT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def test_parse_a_valid_header() -> None:
    parsed = tracing.parse(VALID)
    assert parsed == tracing.TraceParent(
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01"
    )
    assert str(parsed) == VALID
    assert tracing.parse(VALID.encode()) == parsed
    assert tracing.parse(f"  {VALID} ") == parsed


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        VALID.upper(),  # lowercase hex only
        VALID[:-1],  # too short
        VALID + "0",  # version 00 has exactly four fields
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",  # not hex
        b"\xff\xfe",
    ],
)
def test_parse_refuses_malformed_headers(value: str | bytes | None) -> None:
    assert tracing.parse(value) is None


def test_a_later_version_is_read_for_the_fields_version_00_knows() -> None:
    later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next"
    parsed = tracing.parse(later)
    assert parsed is not None
    assert parsed.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.parse(later.replace("-01-what", "-01xwhat")) is None


def test_continue_keeps_the_trace_and_makes_a_new_span() -> None:
    hop = tracing.continue_or_start(VALID)
    assert hop.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert hop.span_id != "00f067aa0ba902b7"
    assert hop.flags == "01"
    assert FORMAT.fullmatch(str(hop))


@pytest.mark.parametrize("value", [None, "garbage"])
def test_a_missing_or_malformed_header_starts_a_new_trace(value: str | None) -> None:
    first, second = tracing.continue_or_start(value), tracing.continue_or_start(value)
    assert FORMAT.fullmatch(str(first))
    assert first.trace_id != second.trace_id
    assert tracing.parse(str(first)) == first
