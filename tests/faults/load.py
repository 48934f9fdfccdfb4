"""Creates over HTTP at a steady rate, every answer kept with its time.

What a Postgres fault test needs to check a client's view: which creates were answered
201 (by id, and when), and that everything else was a 503 with ``Retry-After``, never a
500 or a dropped connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Answer:
    n: int  # the create's number, in its payload: {"n": n}
    sent_at: float  # time.monotonic()
    answered_at: float
    status: int | None  # None: no HTTP answer at all (a connection error, a timeout)
    task_id: uuid.UUID | None  # on a 201
    retry_after: str | None
    text: str


async def _create(client: httpx.AsyncClient, n: int) -> Answer:
    sent_at = time.monotonic()
    try:
        reply = await client.post("/api/v1/tasks", json={"type": "echo", "payload": {"n": n}})
    except httpx.HTTPError as exc:
        return Answer(n, sent_at, time.monotonic(), None, None, None, repr(exc))
    task_id = uuid.UUID(reply.json()["id"]) if reply.status_code == 201 else None
    return Answer(
        n,
        sent_at,
        time.monotonic(),
        reply.status_code,
        task_id,
        reply.headers.get("Retry-After"),
        reply.text,
    )


class SteadyLoad:
    """POST one echo task every 1/``rate`` s until stopped, keeping every answer (in
    ``answers``, as they arrive). A slow answer does not slow the rate: each create is
    its own request, as from many clients."""

    def __init__(self, base_url: str, rate: float) -> None:
        self.base_url = base_url
        self.rate = rate
        self.answers: list[Answer] = []
        self.stop = asyncio.Event()

    def accepted(self) -> int:
        """How many creates were answered 201 so far."""
        return sum(1 for a in self.answers if a.status == 201)

    async def run(self) -> list[Answer]:
        """Until ``stop`` is set; every answer, in the order the creates were sent."""
        async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as client:
            jobs: list[asyncio.Task[Answer]] = []
            next_at = time.monotonic()
            while not self.stop.is_set():
                job = asyncio.create_task(_create(client, len(jobs)))
                job.add_done_callback(lambda done: self.answers.append(done.result()))
                jobs.append(job)
                next_at += 1 / self.rate
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self.stop.wait(), timeout=max(0.0, next_at - time.monotonic())
                    )
            return list(await asyncio.gather(*jobs))


async def create_at_a_steady_rate(base_url: str, rate: float, stop_at: float) -> list[Answer]:
    """A ``SteadyLoad`` until ``stop_at`` (monotonic)."""
    load = SteadyLoad(base_url, rate)
    running = asyncio.create_task(load.run())
    await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
    load.stop.set()
    return await running


def accepted(answers: list[Answer]) -> list[uuid.UUID]:
    """The ids of the tasks answered 201."""
    return [a.task_id for a in answers if a.status == 201 and a.task_id is not None]


def refused_wrongly(answers: list[Answer]) -> list[Answer]:
    """Answers that are neither a 201 nor a 503 that says when to retry."""
    return [
        a
        for a in answers
        if a.status != 201 and not (a.status == 503 and a.retry_after is not None)
    ]
