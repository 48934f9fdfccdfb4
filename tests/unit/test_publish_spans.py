"""The relay's publish spans: one per row, each under the context its row stored."""

from __future__ import annotations

import uuid
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from taskbox.db.outbox import PublishRefusal
from taskbox.relay.publish_spans import record_publish_spans
from taskbox.relay.publisher import PublishReport

STORED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def row(outbox_id: int, headers: Any) -> dict[str, Any]:
    task_id = uuid.uuid4()
    return {
        "id": outbox_id,
        "kind": "task.created",
        "body": {"task_id": str(task_id), "type": "echo", "priority": 0},
        "headers": headers,
    }


def test_each_row_gets_a_producer_span_under_its_stored_context() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    rows = [
        row(1, {"traceparent": STORED}),
        row(2, {"traceparent": STORED}),
        row(3, None),  # a row from before traces were stored
        row(4, {"traceparent": 42}),  # not a header at all: ignored, not a crash
    ]
    report = PublishReport(published=[1, 3, 4], refused=[PublishRefusal(2, "NACK", 1.5)])

    record_publish_spans(provider.get_tracer("test"), rows, report, "taskbox", 1_000, 2_000)

    spans = {
        int(span.attributes["taskbox.outbox.id"]): span  # type: ignore[index, arg-type]
        for span in exporter.get_finished_spans()
    }
    assert sorted(spans) == [1, 2, 3, 4]
    for outbox_id in (1, 2):
        span = spans[outbox_id]
        assert span.kind == SpanKind.PRODUCER
        assert span.context is not None and span.parent is not None
        assert f"{span.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
        assert (span.start_time, span.end_time) == (1_000, 2_000)
    assert spans[1].status.status_code == StatusCode.UNSET
    assert spans[2].status.status_code == StatusCode.ERROR
    assert spans[2].status.description == "NACK"
    assert spans[3].parent is None and spans[4].parent is None  # traces of their own
    assert spans[1].attributes is not None
    assert spans[1].attributes["taskbox.task.id"] == rows[0]["body"]["task_id"]
    assert spans[1].attributes["messaging.destination.name"] == "taskbox"
