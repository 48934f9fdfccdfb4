"""The relay's and the consumer's HTTP port: ``/metrics``, ``/healthz`` and ``/readyz``.

- ``/metrics``: the process's Prometheus registry, in the text exposition format.
- ``/healthz`` (liveness): 200 while every watched loop has shown progress recently; 503
  names the loops that stalled, so an orchestrator restarts the process.
- ``/readyz`` (readiness): 200 while the process is connected to Postgres and RabbitMQ;
  503 names what is missing.

A few dozen lines over ``asyncio.start_server`` rather than a web framework: three
GET endpoints, answered and closed, each request read with a deadline and a size cap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# A check answers None when all is well, else a short description of what is wrong.
ReadinessCheck = Callable[[], Awaitable[str | None]]

_CHECK_TIMEOUT = 2.0
_REQUEST_TIMEOUT = 5.0
_MAX_REQUEST_HEAD = 16 * 1024
_JSON = "application/json"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class PortUnavailable(RuntimeError):
    """The metrics port cannot be bound (taken, or not allowed)."""


def new_registry() -> CollectorRegistry:
    """A registry with the standard process, platform and garbage-collector metrics.

    Each process builds its own (no module-level default registry), so tests can run
    several relays or consumers in one interpreter without their metrics colliding.
    """
    # The *_created series (when each counter was born) double the output and no
    # dashboard reads them.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


@dataclass(frozen=True, slots=True)
class ReadCounter:
    """A counter the code already keeps as a plain attribute, read when scraped."""

    name: str
    documentation: str
    read: Callable[[], float]


@dataclass(frozen=True, slots=True)
class ReadGauge:
    name: str
    documentation: str
    read: Callable[[], float]


class AttributeCollector(Collector):
    """Exposes values the process counts anyway (``relay.published_total``,
    ``listener.reconnects``): no work on the hot path, the read happens at scrape time."""

    def __init__(self, values: Iterable[ReadCounter | ReadGauge]) -> None:
        self._values = list(values)

    def collect(self) -> Iterable[Metric]:
        for value in self._values:
            if isinstance(value, ReadCounter):
                yield CounterMetricFamily(value.name, value.documentation, value=value.read())
            else:
                yield GaugeMetricFamily(value.name, value.documentation, value=value.read())


@dataclass(slots=True)
class _Watched:
    last_beat: Callable[[], float]  # time.monotonic() of the loop's last progress
    within: float


class Probes:
    """What ``/healthz`` and ``/readyz`` check."""

    def __init__(self) -> None:
        self._watched: dict[str, _Watched] = {}
        self._checks: dict[str, ReadinessCheck] = {}
        # The port is bound before the servers are reached (a taken port fails at once);
        # until then the process is alive but not ready.
        self._started = False

    def started(self) -> None:
        self._started = True

    def watch(self, loop: str, last_beat: Callable[[], float], within: float) -> None:
        """``loop`` is alive while ``last_beat()`` is less than ``within`` seconds old."""
        self._watched[loop] = _Watched(last_beat, within)

    def require(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    def liveness(self) -> tuple[bool, dict[str, object]]:
        now = time.monotonic()
        loops = {name: round(now - w.last_beat(), 3) for name, w in self._watched.items()}
        stalled = sorted(n for n, w in self._watched.items() if loops[n] > w.within)
        body: dict[str, object] = {"status": "stalled" if stalled else "ok", "loops": loops}
        if stalled:
            body["stalled"] = stalled
        return not stalled, body

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        if not self._started:
            return False, {"status": "starting"}
        names = list(self._checks)
        results = await asyncio.gather(*(self._run(self._checks[n]) for n in names))
        checks = {name: result or "ok" for name, result in zip(names, results, strict=True)}
        ready = all(result is None for result in results)
        return ready, {"status": "ready" if ready else "unavailable", **checks}

    @staticmethod
    async def _run(check: ReadinessCheck) -> str | None:
        try:
            async with asyncio.timeout(_CHECK_TIMEOUT):
                return await check()
        except TimeoutError:
            return f"no answer within {_CHECK_TIMEOUT:g}s"
        except Exception as exc:  # a probe reports failures, it never raises them
            return f"{type(exc).__name__}: {exc}".strip().rstrip(":")


class ProbeServer:
    """Serves a registry and the probes on ``host:port`` until closed."""

    def __init__(self, registry: CollectorRegistry, probes: Probes, host: str, port: int) -> None:
        self._registry = registry
        self._probes = probes
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0 in tests)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind now, so a taken port stops the process at start, not later."""
        try:
            self._server = await asyncio.start_server(
                self._handle, self._host, self._port, limit=_MAX_REQUEST_HEAD
            )
        except OSError as exc:
            raise PortUnavailable(
                f"cannot serve metrics on {self._host}:{self._port}: {exc}"
            ) from exc
        log.info("metrics and health on http://%s:%d/metrics", self._host, self.port)

    async def serve(self) -> None:
        """Run until cancelled (a supervised background loop)."""
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, content_type, body = await self._answer(method, target.split("?", 1)[0])
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, content_type, body = 400, "text/plain", b"bad request\n"
            method = "GET"
        try:
            writer.write(
                (
                    f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Cache-Control: no-store\r\n"
                    "Connection: close\r\n\r\n"
                ).encode("latin-1")
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except ConnectionError:
            pass  # the client went away; nothing to tell it
        finally:
            writer.close()

    async def _answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        if path not in ("/metrics", "/healthz", "/readyz"):
            return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            ok, document = self._probes.liveness()
        else:
            ok, document = await self._probes.readiness()
        return (200 if ok else 503), _JSON, orjson.dumps(document) + b"\n"


async def start_probe_server(
    registry: CollectorRegistry, probes: Probes, host: str, port: int
) -> ProbeServer | None:
    """The process's metrics and probe server, bound now; None when ``port`` is 0."""
    if not port:
        return None
    server = ProbeServer(registry, probes, host, port)
    await server.start()
    return server
