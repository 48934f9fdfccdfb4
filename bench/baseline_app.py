"""The ingest baseline: bare FastAPI + asyncpg, one INSERT per request, no outbox.

Served by the same uvicorn settings as Taskbox's API so the ratio isolates what Taskbox
adds (validation against the registry, the outbox row, the wake-up).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
from fastapi import FastAPI
from pydantic import BaseModel

from taskbox.db.pool import init_connection
from taskbox.db.settings import DatabaseSettings

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS bench_baseline (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""


class Body(BaseModel):
    type: str
    payload: dict[str, Any]


class Created(BaseModel):
    id: uuid.UUID
    type: str
    created_at: datetime


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # A plain asyncpg pool, as a user would write it: same size as Taskbox's, same
    # jsonb codec, asyncpg's defaults otherwise.
    settings = DatabaseSettings(database_url=os.environ["DATABASE_URL"])
    pool = await asyncpg.create_pool(
        settings.database_url,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        init=init_connection,
    )
    await pool.execute(CREATE_TABLE)
    app.state.pool = pool
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


@app.post("/baseline", status_code=201, response_model=Created)
async def create(body: Body) -> Created:
    pool: asyncpg.Pool = app.state.pool
    row = await pool.fetchrow(
        "INSERT INTO bench_baseline (type, payload) VALUES ($1, $2) RETURNING id, type, created_at",
        body.type,
        body.payload,
    )
    return Created.model_validate(dict(row))
