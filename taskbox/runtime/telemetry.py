"""OpenTelemetry tracing of a process: whether it is on, its tracer, and its end.

Off by default (runtime.settings.TracingSettings says when it is on). Off, nothing of the
SDK is imported and no tracer provider is installed: the processes get ``tracer=None``
and skip every span, so a task costs what it cost before tracing existed. On, the
process installs an SDK tracer provider (as the global one too, so that handlers' own
spans join the attempt's trace) with a BatchSpanProcessor per exporter, and flushes it
when it stops gracefully.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import trace

from taskbox.runtime.settings import TracingSettings, mask_url

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

# The instrumentation scope of Taskbox's own spans.
SCOPE = "taskbox"

# How long a graceful stop waits for the last spans to reach the collector.
FLUSH_TIMEOUT_MILLIS = 5_000


@dataclass(frozen=True, slots=True)
class Tracing:
    """A process's tracing: ``tracer`` is None when it is off."""

    tracer: trace.Tracer | None = None
    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def shutdown(self) -> None:
        """Export the spans still batched, then stop the exporters."""
        if self.provider is not None:
            self.provider.force_flush(FLUSH_TIMEOUT_MILLIS)
            self.provider.shutdown()


OFF = Tracing()


def start_tracing(settings: TracingSettings, service_name: str) -> Tracing:
    """The process's tracing as ``settings`` ask: OFF, or a tracer exporting spans of
    ``service_name`` (OTEL_SERVICE_NAME wins)."""
    exporters = settings.trace_exporters()
    if not exporters:
        return OFF
    # Imported here, not at the top: a process that does not trace never loads the SDK.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    name = settings.otel_service_name or service_name
    # The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on).
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    for exporter_name in exporters:
        exporter: SpanExporter
        if exporter_name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = settings.otlp_traces_endpoint()
            exporter = OTLPSpanExporter(endpoint=endpoint)
            log.info("tracing on: OTLP/HTTP to %s as %s", mask_url(endpoint), name)
        else:
            exporter = ConsoleSpanExporter(service_name=name)
            log.info("tracing on: spans printed to stdout as %s", name)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return Tracing(provider.get_tracer(SCOPE), provider)
