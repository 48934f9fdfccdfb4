"""The relay's ``outbox publish`` spans: one PRODUCER span per outbox row published.

One span per row, not one per batch: a batch holds rows of hundreds of unrelated
requests, and a batch span could have only one of their traces as its parent (the rest
as links), leaving the others' traces without their publish. Each row's span is the
child of the context its outbox row stored (the api's ``task.create``), so every trace
shows its own publish, from the batch's write to the broker's confirm (or refusal).

The spans are made after the batch's outcome is known, with the batch's start and end
times given explicitly: nothing is done per row before or during the publish, and with
tracing off (no tracer) nothing at all.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.context import Context

from taskbox.relay.publisher import OutboxRow, PublishReport
from taskbox.runtime import tracing

SPAN_NAME = "outbox publish"


def record_publish_spans(
    tracer: trace.Tracer,
    rows: Sequence[OutboxRow],
    report: PublishReport,
    exchange: str,
    started_ns: int,
    ended_ns: int,
) -> None:
    refusals = {refusal.outbox_id: refusal for refusal in report.refused}
    for row in rows:
        outbox_id = row["id"]
        value = (row["headers"] or {}).get(tracing.HEADER)
        stored = tracing.parse(value) if isinstance(value, str) else None
        body = row["body"]
        span = tracer.start_span(
            SPAN_NAME,
            # An empty context, not the current one: a row without a stored trace (an
            # old row) starts its own rather than joining whatever runs here.
            context=stored.context() if stored is not None else Context(),
            kind=trace.SpanKind.PRODUCER,
            start_time=started_ns,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "send",
                "messaging.destination.name": exchange,
                "messaging.message.id": str(outbox_id),
                "taskbox.task.id": str(body["task_id"]),
                "taskbox.task.type": str(body["type"]),
                "taskbox.outbox.id": outbox_id,
                "taskbox.outbox.kind": str(row["kind"]),
            },
        )
        refusal = refusals.get(outbox_id)
        if refusal is not None:
            span.set_attribute("taskbox.publish.retry_in", refusal.retry_in)
            span.set_status(trace.StatusCode.ERROR, refusal.error)
        span.end(end_time=ended_ns)
