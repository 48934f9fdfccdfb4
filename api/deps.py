"""Request dependencies as ``Annotated`` aliases; the objects live on ``app.state``."""

from __future__ import annotations

from typing import Annotated

import asyncpg
from fastapi import Depends, Request

from api.service import TaskService


def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.pool
    return pool


def _service(request: Request) -> TaskService:
    service: TaskService = request.app.state.service
    return service


Pool = Annotated[asyncpg.Pool, Depends(_pool)]
Service = Annotated[TaskService, Depends(_service)]
