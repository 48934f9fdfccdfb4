"""W3C Trace Context (``traceparent``) carried from the API request to the consumer.

The API takes the caller's ``traceparent`` (or starts a trace) and stores its own hop's
context in the outbox row's headers, the relay copies those headers onto the AMQP
message, and the consumer puts the trace id on every log line of that task, so one id
finds the request, the publish and the run in the logs. With tracing on
(runtime.telemetry) the same context parents the spans: the stored hop is the
``task.create`` span, and the relay's publish and the consumer's attempt are its
children.

Headers are read by OpenTelemetry's W3C propagator: format version 00 is
``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``, lowercase, neither id all
zeros; a later version may append fields. A malformed header is ignored (a new trace
starts), as the specification asks of a receiver.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

HEADER = "traceparent"

PROPAGATOR = TraceContextTextMapPropagator()
_ZERO_SPAN = "0" * 16
_ZERO_TRACE = "0" * 32
SAMPLED = "01"


@dataclass(frozen=True, slots=True)
class TraceParent:
    trace_id: str
    span_id: str
    flags: str = SAMPLED

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceParent:
        """The same trace, with a new span id for this hop."""
        return TraceParent(self.trace_id, new_span_id(), self.flags)

    def context(self) -> Context:
        """An OpenTelemetry context whose (remote) parent is this one: what a span
        started for this hop's work is the child of."""
        parent = trace.SpanContext(
            int(self.trace_id, 16),
            int(self.span_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(int(self.flags, 16)),
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(parent))


# Ids need to be unique, not secret: Python's Mersenne Twister is plenty, and unlike
# the secrets module it costs no system call on every created task.
def new_span_id() -> str:
    while (span := f"{random.getrandbits(64):016x}") == _ZERO_SPAN:
        pass
    return span


def new_trace() -> TraceParent:
    while (trace_id := f"{random.getrandbits(128):032x}") == _ZERO_TRACE:
        pass
    return TraceParent(trace_id, new_span_id())


def parse(value: str | bytes | None) -> TraceParent | None:
    """The trace context in a ``traceparent`` header, or None when absent or invalid."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    found = trace.get_current_span(PROPAGATOR.extract({HEADER: value})).get_span_context()
    if not found.is_valid:
        return None
    return TraceParent(
        trace.format_trace_id(found.trace_id),
        trace.format_span_id(found.span_id),
        f"{found.trace_flags:02x}",
    )


def current_headers() -> dict[str, str]:
    """The current span's context as outbox headers (empty without a valid span)."""
    headers: dict[str, str] = {}
    PROPAGATOR.inject(headers)
    return headers


def continue_or_start(value: str | bytes | None) -> TraceParent:
    """This hop's trace context: a child of the incoming one, or a new trace."""
    incoming = parse(value)
    return incoming.child() if incoming is not None else new_trace()
