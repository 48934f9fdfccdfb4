"""What the real processes believe and print: proxy headers only from the proxies in
FORWARDED_ALLOW_IPS, and no secret in the message of a process refusing its settings.

``python -m api|relay|consumer|db`` as an operator starts them, over the real Postgres
and RabbitMQ.
"""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.integration.processes import ServiceProcess, free_port

CLIENT = "203.0.113.7"  # what a client claims to be, in X-Forwarded-For


# -- X-Forwarded-For -------------------------------------------------------------------


async def access_line(service_env: dict[str, str], **extra_env: str) -> str:
    """The access log line of one request from 127.0.0.1 claiming to come from CLIENT."""
    port = free_port()
    api = await ServiceProcess(
        "api", service_env, API_PORT=str(port), LOG_FORMAT="text", **extra_env
    ).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            response = await client.get("/healthz", headers={"X-Forwarded-For": CLIENT})
            assert response.status_code == 200, response.text
        await api.wait_for('"GET /healthz HTTP/1.1" 200', timeout=5)
    finally:
        assert await api.stop(signal.SIGTERM) in (0, -signal.SIGTERM), api.output
    (line,) = [line for line in api.lines if '"GET /healthz HTTP/1.1" 200' in line]
    return line


@pytest.mark.parametrize(
    "proxies",
    [None, "10.20.30.40", "10.0.0.0/8,::1"],
    ids=["none-configured", "another-proxy", "other-networks"],
)
async def test_the_api_ignores_x_forwarded_for_from_a_peer_that_is_not_a_proxy(
    service_env: dict[str, str], proxies: str | None
) -> None:
    extra = {} if proxies is None else {"FORWARDED_ALLOW_IPS": proxies}
    env = {k: v for k, v in service_env.items() if k != "FORWARDED_ALLOW_IPS"}
    line = await access_line(env, **extra)
    assert CLIENT not in line, line
    assert " 127.0.0.1:" in line, line


async def test_the_api_believes_x_forwarded_for_from_a_configured_proxy(
    service_env: dict[str, str],
) -> None:
    line = await access_line(service_env, FORWARDED_ALLOW_IPS="127.0.0.1")
    assert f" {CLIENT}:" in line, line
