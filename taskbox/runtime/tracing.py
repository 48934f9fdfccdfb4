"""W3C Trace Context (``traceparent``) carried from the API request to the consumer's logs.

Taskbox records no spans; it only keeps a trace together. The API takes the caller's
``traceparent`` (or starts a trace), stores it with its own span id in the outbox
row's headers, the relay copies those headers onto the AMQP message, and the consumer
puts the trace id on every log line of that task, so one id finds the request, the
publish and the run in the logs.

Format (version 00): ``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``,
lowercase, neither id all zeros. A malformed header is ignored (a new trace starts),
as the specification asks of a receiver.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

HEADER = "traceparent"

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
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


# Ids need to be unique, not secret: Python's Mersenne Twister is plenty, and unlike
# the secrets module it costs no system call on every created task.
def new_span_id() -> str:
    while (span := f"{random.getrandbits(64):016x}") == _ZERO_SPAN:
        pass
    return span


def new_trace() -> TraceParent:
    while (trace := f"{random.getrandbits(128):032x}") == _ZERO_TRACE:
        pass
    return TraceParent(trace, new_span_id())


def parse(value: str | bytes | None) -> TraceParent | None:
    """The trace context in a ``traceparent`` header, or None when absent or invalid."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip()
    found = _TRACEPARENT.match(value)
    if found is None:
        return None
    version, trace_id, span_id, flags = found.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    # Version 00 is exactly 55 characters; a later version may append fields after a dash,
    # and a receiver that knows only 00 reads the four it knows.
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    return TraceParent(trace_id, span_id, flags)


def continue_or_start(value: str | bytes | None) -> TraceParent:
    """This hop's trace context: a child of the incoming one, or a new trace."""
    incoming = parse(value)
    return incoming.child() if incoming is not None else new_trace()
