"""The ``task.create`` span, and the trace context a created task's outbox row carries.

That context is the hop the consumer's attempt (and the relay's publish) hang under.
With tracing off it is the caller's ``traceparent`` with a new span id of our own (or a
new trace), as before tracing existed; with tracing on it is the ``task.create`` span,
the child of FastAPI's server span for the request, which already continued the
caller's ``traceparent``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from taskbox.runtime import tracing

TASK_ID = "taskbox.task.id"
TASK_TYPE = "taskbox.task.type"
TASK_COUNT = "taskbox.task.count"
TASK_CREATED = "taskbox.task.created"  # false: an Idempotency-Key repeat, nothing stored


Created = tuple[trace.Span | None, dict[str, str]]


class _Untraced:
    """Tracing off: the headers alone. A plain class, not a generator-based context
    manager, which would cost every create about a microsecond more."""

    __slots__ = ("_created",)

    def __init__(self, traceparent: str | None) -> None:
        self._created: Created = (
            None,
            {tracing.HEADER: str(tracing.continue_or_start(traceparent))},
        )

    def __enter__(self) -> Created:
        return self._created

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


class CreateSpans:
    def __init__(self, tracer: trace.Tracer | None) -> None:
        self._tracer = tracer

    def create(
        self, traceparent: str | None, attributes: Mapping[str, AttributeValue]
    ) -> AbstractContextManager[Created]:
        """The ``task.create`` span (None when tracing is off) and the outbox headers
        that carry its context."""
        if self._tracer is None:
            return _Untraced(traceparent)
        return self._traced(self._tracer, traceparent, attributes)

    @contextmanager
    def _traced(
        self,
        tracer: trace.Tracer,
        traceparent: str | None,
        attributes: Mapping[str, AttributeValue],
    ) -> Iterator[Created]:
        parent = None  # the current context: FastAPI's server span for the request
        if not trace.get_current_span().get_span_context().is_valid:
            # Called outside a traced request (a test, an embedding application): the
            # caller's header is all there is.
            incoming = tracing.parse(traceparent)
            parent = incoming.context() if incoming is not None else None
        with tracer.start_as_current_span(
            "task.create", context=parent, attributes=attributes
        ) as span:
            yield span, tracing.current_headers()
