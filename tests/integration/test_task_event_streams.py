"""Server-sent event streams from a real api process, with a real relay and consumer
running the tasks, behind the API key gate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.integration.processes import ServiceProcess, free_port

TASKS = "/api/v1/tasks"
KEY = "stream-key"


@dataclass
class Stream:
    """What an event stream sent, message by message."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: str | None = None
    ended: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def statuses(self) -> list[str]:
        return [data["status"] for name, data in self.events if name == "task"]

    async def until(self, count: int, within: float = 20.0) -> None:
        async with asyncio.timeout(within):
            while len(self.events) < count and not self.ended:
                self.arrived.clear()
                await self.arrived.wait()


async def _read(response: httpx.Response, into: Stream) -> None:
    name, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith(":"):
            into.comments.append(line)
        elif line.startswith("retry:"):
            into.retry = line.split(":", 1)[1].strip()
        elif line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data += line.split(":", 1)[1].strip()
        elif line == "" and data:
            into.events.append((name, json.loads(data)))
            name, data = "message", ""
        into.arrived.set()
    into.ended = True
    into.arrived.set()


async def _follow(
    client: httpx.AsyncClient, path: str, stream: Stream, params: Any = None
) -> AsyncIterator[None]:
    async with client.stream("GET", path, params=params) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-request-id"]
        yield
        await _read(response, stream)


async def follow(
    client: httpx.AsyncClient, path: str, stream: Stream, params: Any = None
) -> asyncio.Task[None]:
    """Open the stream (its 200 is in when this returns) and read it in the background."""
    opened = asyncio.Event()

    async def run() -> None:
        async for _ in _follow(client, path, stream, params):
            opened.set()

    task = asyncio.create_task(run())
    async with asyncio.timeout(10):
        await opened.wait()
    return task


async def test_streams_follow_tasks_run_by_a_real_relay_and_consumer(
    service_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    port = free_port()
    api = ServiceProcess(
        "api", service_env, API_PORT=str(port), API_KEYS=KEY, TASK_EVENTS_HEARTBEAT="0.3"
    )
    processes.append(await api.start())
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
    ) as client:
        anonymous = await client.get(f"{TASKS}/events", headers={"Authorization": ""})
        assert anonymous.status_code == 401

        echo = (await client.post(TASKS, json={"type": "echo", "payload": {"n": 1}})).json()
        one, many = Stream(), Stream()
        one_reader = await follow(client, f"{TASKS}/{echo['id']}/events", one)
        many_reader = await follow(
            client, f"{TASKS}/events", many, params={"status": "DONE", "type": "echo"}
        )
        await one.until(1)
        assert one.statuses() == ["NEW"]
        assert one.retry == "3000"
        other = (await client.post(TASKS, json={"type": "sha256", "payload": {"text": "x"}})).json()
        await asyncio.sleep(0.7)
        assert one.comments  # the heartbeat, while nothing happens

        processes.append(await ServiceProcess("relay", service_env).start())
        processes.append(await ServiceProcess("consumer", service_env).start())
        await asyncio.wait_for(one_reader, 20)
        statuses = one.statuses()
        # The relay's NEW -> PENDING flip may come after the consumer's claim of the NEW
        # task (and then changes nothing): PENDING is there or not, the rest in order.
        assert statuses in (["NEW", "PENDING", "PROCESSING", "DONE"], ["NEW", "PROCESSING", "DONE"])
        assert one.events[-1][1]["id"] == echo["id"]

        await many.until(1)
        # The sha256 task finishes too, but the filter keeps it out.
        done_other = await client.get(f"{TASKS}/{other['id']}", params={"wait": 10})
        assert done_other.json()["status"] == "DONE"
        await asyncio.sleep(0.3)
        assert [data for _, data in many.events] == [
            {"id": echo["id"], "status": "DONE", "type": "echo", "queue": "default"}
        ]
        many_reader.cancel()


async def test_a_finished_tasks_stream_sends_its_state_and_ends(
    service_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    port = free_port()
    processes.append(await ServiceProcess("api", service_env, API_PORT=str(port)).start())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        task = (await client.post(TASKS, json={"type": "echo"})).json()
        assert (await client.delete(f"{TASKS}/{task['id']}")).status_code == 200
        stream = Stream()
        await asyncio.wait_for(await follow(client, f"{TASKS}/{task['id']}/events", stream), 5)
        assert stream.statuses() == ["CANCELLED"]
        missing = await client.get(f"{TASKS}/00000000-0000-0000-0000-000000000001/events")
        assert missing.status_code == 404
        bad = await client.get(f"{TASKS}/events", params={"status": "SLEEPING"})
        assert bad.status_code == 422


async def test_long_polls_and_streams_outlast_the_connection_timeouts(
    service_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    """api.connection_limits bounds the time to send a request, not the time to answer
    one: a wait or a stream longer than every connection timeout is served in full."""
    port = free_port()
    api = ServiceProcess(
        "api",
        service_env,
        API_PORT=str(port),
        API_HEADER_TIMEOUT="1",
        API_BODY_TIMEOUT="1",
        API_KEEP_ALIVE_TIMEOUT="1",
        TASK_EVENTS_HEARTBEAT="0.5",
        TASK_EVENTS_MAX_STREAM="2.5",
    )
    processes.append(await api.start())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        task = (await client.post(TASKS, json={"type": "echo"})).json()
        started = asyncio.get_running_loop().time()
        waited = await client.get(f"{TASKS}/{task['id']}", params={"wait": 2.5})
        assert waited.status_code == 200
        assert waited.json()["status"] == "NEW"
        assert asyncio.get_running_loop().time() - started > 2.4
        stream = Stream()
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(await follow(client, f"{TASKS}/{task['id']}/events", stream), 6)
        # The whole lifetime, heartbeats throughout, then a clean end.
        assert asyncio.get_running_loop().time() - started > 2.4
        assert stream.statuses() == ["NEW"]
        assert len(stream.comments) >= 3
        assert stream.ended
