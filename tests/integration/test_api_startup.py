"""``python -m api`` refuses to serve an unauthenticated API beyond loopback.

With API_KEYS empty anyone who reaches the port can create, read and cancel tasks. On
127.0.0.1 that is a developer's machine; on 0.0.0.0 (the container's address, or an
operator's typo) it is the network. The api then exits 2 before it listens, with a
message naming the settings that fix it, unless ALLOW_UNAUTHENTICATED=true says the
operator means it.
"""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.integration.processes import ServiceProcess, free_port

EXIT_USAGE = 2


async def exit_code_within(process: ServiceProcess, seconds: float) -> int | None:
    """Launch ``process`` and return its exit code, or None (and kill it) if it is
    still running after ``seconds``."""
    await process.launch()
    try:
        return await process.wait(timeout=seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        return None


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
async def test_without_keys_the_api_refuses_to_listen_beyond_loopback(
    service_env: dict[str, str], host: str
) -> None:
    port = free_port()
    api = ServiceProcess(
        "api", service_env, API_HOST=host, API_PORT=str(port), API_KEYS="", LOG_FORMAT="text"
    )

    code = await exit_code_within(api, 15)

    assert code == EXIT_USAGE, api.output
    assert "API_KEYS is empty" in api.output
    assert f"API_HOST={host}" in api.output
    for remedy in ("API_KEYS", "API_HOST=127.0.0.1", "ALLOW_UNAUTHENTICATED=true"):
        assert remedy in api.output, (remedy, api.output)
    assert "Uvicorn running" not in api.output
    assert "Traceback" not in api.output


@pytest.mark.parametrize(
    "extra",
    [
        {"API_HOST": "0.0.0.0", "ALLOW_UNAUTHENTICATED": "true"},
        {"API_HOST": "0.0.0.0", "API_KEYS": "a-key-for-the-test"},
        {"API_HOST": "127.0.0.1"},
    ],
    ids=["all-interfaces-allowed", "all-interfaces-with-keys", "loopback-without-keys"],
)
async def test_the_api_starts_with_keys_on_loopback_or_when_allowed(
    service_env: dict[str, str], extra: dict[str, str]
) -> None:
    port = free_port()
    env = {"API_KEYS": "", "ALLOW_UNAUTHENTICATED": "false", **extra}
    api = await ServiceProcess("api", service_env, API_PORT=str(port), **env).start()
    try:
        await api.wait_for("Uvicorn running on")
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/healthz")
        assert response.status_code == 200, response.text
        # Open on purpose still says so at start.
        assert ("UNAUTHENTICATED" in api.output) == (not env["API_KEYS"]), api.output
    finally:
        assert await api.stop(signal.SIGTERM) in (0, -signal.SIGTERM), api.output
