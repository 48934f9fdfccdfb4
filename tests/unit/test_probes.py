"""The metrics port's tiny HTTP server and its probes, over a real loopback socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from prometheus_client import Counter

from taskbox.runtime.probes import (
    AttributeCollector,
    PortUnavailable,
    Probes,
    ProbeServer,
    ReadCounter,
    ReadGauge,
    new_registry,
)


class Loop:
    """A watched loop whose last sign of life the test sets."""

    def __init__(self) -> None:
        self.alive_at = time.monotonic()


@pytest.fixture
async def served() -> AsyncIterator[tuple[ProbeServer, Probes, Loop, httpx.AsyncClient]]:
    registry = new_registry()
    Counter("demo_events", "Events.", registry=registry).inc(3)
    loop = Loop()
    registry.register(
        AttributeCollector(
            [
                ReadCounter("demo_attribute", "A counter kept as an attribute.", lambda: 7),
                ReadGauge("demo_level", "A gauge read at scrape time.", lambda: 0.5),
            ]
        )
    )
    probes = Probes()
    probes.watch("work", lambda: loop.alive_at, within=5.0)
    server = ProbeServer(registry, probes, "127.0.0.1", 0)
    await server.start()
    serving = asyncio.create_task(server.serve())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        yield server, probes, loop, client
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)


async def test_metrics_in_the_text_format(
    served: tuple[ProbeServer, Probes, Loop, httpx.AsyncClient],
) -> None:
    *_, client = served
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    body = response.text
    assert "demo_events_total 3.0" in body
    assert "demo_attribute_total 7.0" in body
    assert "demo_level 0.5" in body
    assert "process_resident_memory_bytes" in body
    assert "_created" not in body  # the creation-time series are switched off


async def test_healthz_follows_the_watched_loops(
    served: tuple[ProbeServer, Probes, Loop, httpx.AsyncClient],
) -> None:
    _, _, loop, client = served
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    loop.alive_at -= 6.0  # no progress for longer than the loop's allowance
    response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["stalled"] == ["work"]
    assert response.json()["loops"]["work"] > 5.0


async def test_readyz_waits_for_start_then_reports_each_check(
    served: tuple[ProbeServer, Probes, Loop, httpx.AsyncClient],
) -> None:
    _, probes, _, client = served
    response = await client.get("/readyz")
    assert (response.status_code, response.json()) == (503, {"status": "starting"})

    async def fine() -> str | None:
        return None

    async def broken() -> str | None:
        raise ConnectionRefusedError("connection refused")

    async def hanging() -> str | None:
        await asyncio.sleep(60)
        return None

    probes.require("database", fine)
    probes.started()
    response = await client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready", "database": "ok"})

    probes.require("broker", broken)
    probes.require("listen", hanging)
    started = time.monotonic()
    response = await client.get("/readyz")
    assert time.monotonic() - started < 4, "a hanging check must time out"
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "database": "ok",
        "broker": "ConnectionRefusedError: connection refused",
        "listen": "no answer within 2s",
    }


async def test_other_paths_and_methods(
    served: tuple[ProbeServer, Probes, Loop, httpx.AsyncClient],
) -> None:
    server, *_, client = served
    assert (await client.get("/")).status_code == 404
    assert (await client.post("/metrics")).status_code == 405
    head = await client.head("/healthz")
    assert head.status_code == 200
    assert head.content == b""
    # Not HTTP at all: answered 400 and closed, and the server keeps serving.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"\x00garbage\r\n\r\n")
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.1 400 Bad Request")
    writer.close()
    assert orjson.loads((await client.get("/healthz")).content)["status"] == "ok"


async def test_a_taken_port_is_reported_at_start() -> None:
    first = ProbeServer(new_registry(), Probes(), "127.0.0.1", 0)
    await first.start()
    try:
        second = ProbeServer(new_registry(), Probes(), "127.0.0.1", first.port)
        with pytest.raises(
            PortUnavailable, match=f"cannot serve metrics on 127.0.0.1:{first.port}"
        ):
            await second.start()
    finally:
        await first.close()
