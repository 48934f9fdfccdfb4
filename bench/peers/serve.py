"""The peers' ingest endpoint: one uvicorn worker, one POST that enqueues one job.

Shaped like bench/baseline_app.py (the bare ceiling) and answering the same wrk script
(bench/post.lua: ``{"type": ..., "payload": {...}}``), so the peers, Taskbox and the
ceiling differ only in what the request does with the job. Runs in .venv-peers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from bench.peers import kit


class Body(BaseModel):
    type: str
    payload: dict[str, Any]


# Builds the enqueue call inside the server's event loop (pools belong to one loop).
Enqueuer = Callable[
    [], AbstractAsyncContextManager[Callable[[dict[str, Any]], Coroutine[Any, Any, str]]]
]


def serve(port: int, enqueuer: Enqueuer) -> None:
    calls: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, str]]] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with enqueuer() as enqueue:
            calls["enqueue"] = enqueue
            kit.ready()
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/enqueue", status_code=201)
    async def create(body: Body) -> dict[str, str]:
        return {"id": await calls["enqueue"](body.payload)}

    # uvicorn's defaults as `python -m uvicorn` picks them (uvloop, httptools), like
    # the baseline app and Taskbox's api; no access log, like both of them in the bench.
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")
