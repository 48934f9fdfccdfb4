"""POST -> DONE through real api, relay and consumer processes."""

from __future__ import annotations

import hashlib
import signal

import httpx

from tests.integration.conftest import poll_until_done
from tests.integration.processes import ServiceProcess, free_port


async def test_task_posted_over_http_ends_done_with_its_result(service_env: dict[str, str]) -> None:
    port = free_port()
    api = await ServiceProcess("api", service_env, API_PORT=str(port)).start()
    relay = await ServiceProcess("relay", service_env).start()
    consumer = await ServiceProcess("consumer", service_env).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            created = await client.post(
                "/api/v1/tasks", json={"type": "sha256", "payload": {"text": "taskbox"}}
            )
            assert created.status_code == 201, created.text
            assert created.json()["status"] == "NEW"
            location = created.headers["location"]
            task = await poll_until_done(client, location, within=5)
            assert task["result"] == {"sha256": hashlib.sha256(b"taskbox").hexdigest()}
            assert task["attempts"] == 1
    finally:
        assert await consumer.stop(signal.SIGTERM) == 0, consumer.output
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
        # uvicorn re-raises the signal once its graceful shutdown is complete
        assert await api.stop(signal.SIGTERM) in (0, -signal.SIGTERM), api.output
        assert "Application shutdown complete" in api.output
