"""Request dependencies as ``Annotated`` aliases; the objects live on ``app.state``.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in a worker
thread, a thread hand-off per request for what is an attribute lookup.
"""

from __future__ import annotations

from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from taskbox.api.service import TaskService


async def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.pool
    return pool


async def _service(request: Request) -> TaskService:
    service: TaskService = request.app.state.service
    return service


Pool = Annotated[asyncpg.Pool, Depends(_pool)]
Service = Annotated[TaskService, Depends(_service)]
