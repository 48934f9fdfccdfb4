"""POST -> DONE through real api, relay and consumer processes."""

from __future__ import annotations

import hashlib
import signal

import httpx

from taskbox.broker.settings import BrokerSettings
from tests.integration.conftest import poll_until_done
from tests.integration.processes import ServiceProcess, free_port
from tests.integration.test_consumer import assert_queues_empty


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


async def test_with_amqp_pipeline_off_tasks_run_through_aio_pikas_public_api(
    service_env: dict[str, str], broker_settings: BrokerSettings
) -> None:
    """AMQP_PIPELINE=false: the relay publishes with Exchange.publish and the consumer
    settles with ack()/nack()/reject(), none of aiormq's internals: tasks still run once
    each, retries included, and no message is left unsettled."""
    port = free_port()
    public_only = {"AMQP_PIPELINE": "false"}
    api = await ServiceProcess("api", service_env, API_PORT=str(port)).start()
    relay = await ServiceProcess("relay", service_env, **public_only).start()
    consumer = await ServiceProcess(
        "consumer", service_env, RETRY_BASE_DELAY="0.1", **public_only
    ).start()
    try:
        assert "publishing through aio-pika's public API" in relay.output
        assert "settling messages through aio-pika's public API" in consumer.output
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            texts = [f"text {n}" for n in range(40)]
            batch = await client.post(
                "/api/v1/tasks/batch",
                json={"tasks": [{"type": "sha256", "payload": {"text": t}} for t in texts]},
            )
            assert batch.status_code == 201, batch.text
            flaky = await client.post(
                "/api/v1/tasks",
                json={"type": "fail", "payload": {"succeed_on_attempt": 2}},
            )
            assert flaky.status_code == 201, flaky.text
            for item, text in zip(batch.json()["items"], texts, strict=True):
                task = await poll_until_done(client, f"/api/v1/tasks/{item['id']}", within=20)
                assert task["result"] == {"sha256": hashlib.sha256(text.encode()).hexdigest()}
                assert task["attempts"] == 1
            retried = await poll_until_done(client, flaky.headers["location"], within=20)
            assert retried["status"] == "DONE" and retried["attempts"] == 2, retried
    finally:
        assert await consumer.stop(signal.SIGTERM) == 0, consumer.output
        assert await relay.stop(signal.SIGTERM) == 0, relay.output
        assert await api.stop(signal.SIGTERM) in (0, -signal.SIGTERM), api.output
    await assert_queues_empty(broker_settings)
