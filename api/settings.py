"""Settings of the API process."""

from __future__ import annotations

from pydantic import Field

from db.settings import DatabaseSettings
from runtime.settings import ProcessSettings


class ApiSettings(DatabaseSettings, ProcessSettings):
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_workers: int = Field(1, ge=1, description="uvicorn worker processes.")
    outbox_notify_min_interval: float = Field(
        0.002, ge=0, le=1, description="Seconds between two wake-ups this process sends."
    )
    api_access_log: bool = Field(True, description="Log one line per request.")
    default_max_attempts: int = Field(3, ge=1, le=100)
    max_max_attempts: int = Field(25, ge=1, description="Upper bound a client may ask for.")
