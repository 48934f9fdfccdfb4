"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from taskbox.api.deps import Pool
from taskbox.db.errors import TRANSIENT_DB_ERRORS

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database is reachable",
    responses={503: {"description": "The database cannot be reached"}},
)
async def readyz(pool: Pool) -> JSONResponse:
    try:
        async with asyncio.timeout(2):
            await pool.fetchval("SELECT 1")
    except TRANSIENT_DB_ERRORS as exc:
        return JSONResponse(
            {"status": "unavailable", "database": type(exc).__name__}, status_code=503
        )
    return JSONResponse({"status": "ready", "database": "ok"})
