"""OpenTelemetry across real processes: api, relay and consumer export their spans to a
local OTLP/HTTP receiver, in the trace of the caller's ``traceparent``; with tracing
off, nothing is exported and the trace id still reaches the consumer's log lines."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.otlp_receiver import ReceivedSpan, otlp_receiver
from tests.integration.processes import ServiceProcess, free_port

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
INCOMING = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
SERVICES = {"taskbox-api", "taskbox-relay", "taskbox-consumer"}


async def start_services(env: dict[str, str], processes: list[ServiceProcess]) -> str:
    """api, relay and consumer with ``env``; returns the api's base URL."""
    port = free_port()
    for process in (
        ServiceProcess("api", env, API_PORT=str(port)),
        ServiceProcess("relay", env, RELAY_POLL_INTERVAL="0.2"),
        ServiceProcess(
            "consumer",
            env,
            LOG_FORMAT="json",
            LOG_LEVEL="DEBUG",
            RETRY_BASE_DELAY="0.05",
            RETRY_MAX_DELAY="0.1",
        ),
    ):
        processes.append(await process.start())
    return f"http://127.0.0.1:{port}"


async def stop_services(processes: list[ServiceProcess]) -> None:
    """SIGTERM, consumer first: a graceful stop flushes each process's last spans."""
    for process in reversed(processes):
        code = await process.stop(signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown is complete
        assert code in (0, -signal.SIGTERM), process.output


async def create(
    client: httpx.AsyncClient, task: dict[str, Any], traceparent: str | None = None
) -> str:
    headers = {"traceparent": traceparent} if traceparent is not None else {}
    response = await client.post("/api/v1/tasks", json=task, headers=headers)
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


async def wait_for_status(client: httpx.AsyncClient, task_id: str, status: str) -> None:
    seen: dict[str, Any] = {}
    for _ in range(300):
        seen = (await client.get(f"/api/v1/tasks/{task_id}")).json()
        if seen["status"] == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"task {task_id} not {status} within 15s: {seen}")


def only(spans: Iterable[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name!r}: {found}"
    return found[0]


def of_task(spans: Iterable[ReceivedSpan], task_id: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.attributes.get("taskbox.task.id") == task_id]


async def test_spans_from_api_relay_and_consumer_share_the_callers_trace(
    service_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    with otlp_receiver() as receiver:
        env = {
            **service_env,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",  # milliseconds: export soon, not every 5 s
        }
        base_url = await start_services(env, processes)
        async with httpx.AsyncClient(base_url=base_url) as client:
            echo = await create(client, {"type": "echo", "payload": {"x": 1}}, INCOMING)
            flaky = await create(
                client, {"type": "fail", "payload": {"succeed_on_attempt": 2}, "max_attempts": 3}
            )
            broken = await create(client, {"type": "fail", "payload": {"retryable": False}})
            await wait_for_status(client, echo, "DONE")
            await wait_for_status(client, flaky, "DONE")
            await wait_for_status(client, broken, "FAILED")
            assert (await client.get("/healthz")).status_code == 200
        await stop_services(processes)
        spans = receiver.spans

    outputs = "\n".join(process.output for process in processes)
    assert {span.service for span in spans} == SERVICES, outputs

    # Probes leave no span; the polls of the tasks do.
    paths = {span.attributes.get("url.path") for span in spans if span.kind == "server"}
    assert "/healthz" not in paths
    assert f"/api/v1/tasks/{echo}" in paths

    # The echo task: one trace, the caller's, from the request to the attempt.
    traced = [span for span in spans if span.trace_id == CALLER_TRACE]
    server = next(span for span in traced if span.kind == "server")
    assert (server.service, server.parent_id) == ("taskbox-api", CALLER_SPAN)
    assert server.name.startswith("POST")
    created = only(traced, "task.create")
    assert (created.service, created.parent_id) == ("taskbox-api", server.span_id)
    assert created.attributes["taskbox.task.id"] == echo
    assert created.attributes["taskbox.task.type"] == "echo"
    published = only(traced, "outbox publish")
    assert (published.service, published.kind) == ("taskbox-relay", "producer")
    assert published.parent_id == created.span_id
    assert published.attributes["taskbox.task.id"] == echo
    assert not published.error
    attempt = only(traced, "task attempt")
    assert (attempt.service, attempt.kind) == ("taskbox-consumer", "consumer")
    assert attempt.parent_id == created.span_id
    assert {key: attempt.attributes[key] for key in _ATTEMPT_KEYS} == {
        "taskbox.task.id": echo,
        "taskbox.task.type": "echo",
        "taskbox.task.attempt": 1,
        "taskbox.task.outcome": "done",
    }
    assert not attempt.error
    assert {span.span_id for span in traced} == {
        server.span_id,
        created.span_id,
        published.span_id,
        attempt.span_id,
    }

    # A task retried once: both attempts (and both publishes) under its create, the
    # failed attempt marked as an error.
    flaky_created = only(of_task(spans, flaky), "task.create")
    flaky_trace = [span for span in spans if span.trace_id == flaky_created.trace_id]
    attempts = sorted(
        (span for span in flaky_trace if span.name == "task attempt"),
        key=lambda span: span.attributes["taskbox.task.attempt"],
    )
    assert [(a.attributes["taskbox.task.outcome"], a.error) for a in attempts] == [
        ("retry", True),
        ("done", False),
    ]
    assert attempts[0].attributes["error.type"] == "DrillFailure"
    publishes = [span for span in flaky_trace if span.name == "outbox publish"]
    assert [p.attributes["taskbox.outbox.kind"] for p in publishes] == [
        "task.created",
        "task.retry",
    ]
    assert {span.parent_id for span in attempts + publishes} == {flaky_created.span_id}

    # A task that fails for good: its attempt has the error status and says why.
    failed = only(of_task(spans, broken), "task attempt")
    assert failed.attributes["taskbox.task.outcome"] == "failed"
    assert failed.error
    assert failed.status_message == "PermanentError: drill"


_ATTEMPT_KEYS = (
    "taskbox.task.id",
    "taskbox.task.type",
    "taskbox.task.attempt",
    "taskbox.task.outcome",
)


@pytest.mark.parametrize(
    "off",
    [{"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}, {}],
    ids=["sdk-disabled", "exporter-none", "nothing-set"],
)
async def test_with_tracing_off_nothing_is_exported_and_logs_keep_the_trace_id(
    service_env: dict[str, str], processes: list[ServiceProcess], off: dict[str, str]
) -> None:
    with otlp_receiver() as receiver:
        # An endpoint the processes could reach, unless nothing is set at all (then the
        # exporter's default, localhost:4318, would be the one: nobody listens there).
        endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint} if off else {}
        env = {**service_env, **endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50", **off}
        base_url = await start_services(env, processes)
        async with httpx.AsyncClient(base_url=base_url) as client:
            echo = await create(client, {"type": "echo", "payload": {}}, INCOMING)
            await wait_for_status(client, echo, "DONE")
        consumer = processes[-1]
        await consumer.wait_for('"attempt committed: DONE"')
        await stop_services(processes)
        assert receiver.requests == 0

    for process in processes:
        assert "tracing on" not in process.output, process.output
    lines = [orjson.loads(line) for line in consumer.lines if line.startswith("{")]
    done = next(line for line in lines if line["message"] == "attempt committed: DONE")
    assert (done["task_id"], done["trace_id"]) == (echo, CALLER_TRACE)
