"""When tracing is on (the OTEL_* rule), what is refused at start, what a process loads
when it is off, and how an attempt's outcome is named on its span."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import ValidationError

from taskbox.api.create_spans import CreateSpans
from taskbox.consumer.attempt import ClaimedTask
from taskbox.consumer.attempt_spans import end_attempt_span, outcome_name, start_attempt_span
from taskbox.db.execution import Outcome
from taskbox.runtime import tracing
from taskbox.runtime.settings import TracingSettings

ENDPOINT = "http://collector:4318"


def settings(**values: Any) -> TracingSettings:
    # _env_file=None: the rule alone, not a developer's .env
    return TracingSettings(_env_file=None, **values)


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("values", "exporters"),
    [
        ({}, []),  # off by default
        ({"otel_exporter_otlp_endpoint": ENDPOINT}, ["otlp"]),
        ({"otel_exporter_otlp_traces_endpoint": f"{ENDPOINT}/v1/traces"}, ["otlp"]),
        ({"otel_traces_exporter": "otlp"}, ["otlp"]),  # to localhost:4318
        ({"otel_traces_exporter": "console"}, ["console"]),
        ({"otel_traces_exporter": "otlp, Console"}, ["otlp", "console"]),
        ({"otel_traces_exporter": "none", "otel_exporter_otlp_endpoint": ENDPOINT}, []),
        ({"otel_sdk_disabled": True, "otel_exporter_otlp_endpoint": ENDPOINT}, []),
        ({"otel_sdk_disabled": True, "otel_traces_exporter": "otlp"}, []),
    ],
)
def test_tracing_is_on_only_when_asked(values: dict[str, Any], exporters: list[str]) -> None:
    assert settings(**values).trace_exporters() == exporters


def test_the_traces_endpoint_is_the_base_url_with_its_path_unless_given_whole() -> None:
    assert settings().otlp_traces_endpoint() == "http://localhost:4318/v1/traces"
    base = settings(otel_exporter_otlp_endpoint=f"{ENDPOINT}/")
    assert base.otlp_traces_endpoint() == f"{ENDPOINT}/v1/traces"
    whole = settings(
        otel_exporter_otlp_endpoint=ENDPOINT, otel_exporter_otlp_traces_endpoint="http://t/x"
    )
    assert whole.otlp_traces_endpoint() == "http://t/x"


def test_the_standard_variables_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", ENDPOINT)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ingest-eu")
    read = settings()
    assert (read.trace_exporters(), read.otel_service_name) == (["otlp"], "ingest-eu")


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"otel_traces_exporter": "zipkin"}, "OTEL_TRACES_EXPORTER names zipkin"),
        ({"otel_exporter_otlp_protocol": "grpc"}, "http/protobuf"),
        ({"otel_exporter_otlp_traces_protocol": "http/json"}, "http/protobuf"),
        ({"otel_exporter_otlp_endpoint": "collector:4318"}, "http://"),
    ],
)
def test_what_taskbox_cannot_export_with_is_refused_at_start(
    values: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValidationError, match=says):
        settings(**values)


def test_off_a_process_loads_no_sdk_and_installs_no_tracer_provider() -> None:
    # A fresh interpreter: this one may have loaded the SDK for another test.
    program = """
import sys
from opentelemetry import trace
import taskbox.api.asgi, taskbox.relay.__main__, taskbox.consumer.__main__
from taskbox.runtime.settings import TracingSettings
from taskbox.runtime.telemetry import OFF, start_tracing
assert start_tracing(TracingSettings(), "taskbox-test") is OFF
assert not [m for m in sys.modules if m.startswith("opentelemetry.sdk")], "SDK loaded"
assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_off_the_outbox_headers_continue_the_callers_trace_with_a_hop_of_our_own() -> None:
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with CreateSpans(None).create(incoming, {}) as (span, headers):
        assert span is None
    stored = tracing.parse(headers[tracing.HEADER])
    assert stored is not None
    assert stored.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert stored.span_id != "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("asked", "recorded", "name"),
    [
        ("DONE", "DONE", "done"),
        ("NEW", "NEW", "retry"),
        ("PENDING", "NEW", "released"),
        ("FAILED", "FAILED", "failed"),
        ("CANCELLED", "CANCELLED", "cancelled"),
        ("DONE", None, "superseded"),
    ],
)
def test_an_attempts_outcome_is_what_the_commit_recorded(
    asked: str, recorded: str | None, name: str
) -> None:
    assert outcome_name(Outcome(uuid.uuid4(), 1, asked, lease=1), recorded) == name


def _attempt_span_ended(outcome: Outcome | None, recorded: str | None) -> ReadableSpan:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    claimed = ClaimedTask(uuid.uuid4(), "fail", {}, 2, 3, lease=7, outbox_id=11)
    claimed.trace = tracing.parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    span = start_attempt_span(provider.get_tracer("test"), claimed, "taskbox.tasks")
    end_attempt_span(span, outcome, recorded)
    (ended,) = exporter.get_finished_spans()
    assert ended.parent is not None and f"{ended.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert ended.attributes is not None
    assert (ended.attributes["taskbox.task.attempt"], ended.attributes["taskbox.outbox.id"]) == (
        2,
        11,
    )
    return ended


def test_a_retried_attempt_span_has_the_error_status_and_type() -> None:
    error = {"type": "DrillFailure", "message": "drill"}
    retried = Outcome(uuid.uuid4(), 2, "NEW", error=error, retry_in=0.5, lease=7)
    ended = _attempt_span_ended(retried, "NEW")
    assert ended.attributes is not None
    assert ended.attributes["taskbox.task.outcome"] == "retry"
    assert ended.attributes["error.type"] == "DrillFailure"
    assert ended.status.status_code == StatusCode.ERROR
    assert ended.status.description == "DrillFailure: drill"


def test_a_done_or_lost_attempt_span_is_no_error() -> None:
    done = _attempt_span_ended(Outcome(uuid.uuid4(), 2, "DONE", lease=7), "DONE")
    lost = _attempt_span_ended(None, None)
    assert done.attributes is not None and lost.attributes is not None
    assert (done.attributes["taskbox.task.outcome"], lost.attributes["taskbox.task.outcome"]) == (
        "done",
        "lost",
    )
    assert done.status.status_code == lost.status.status_code == StatusCode.UNSET
