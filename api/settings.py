"""Settings of the API process."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from db.settings import DatabaseSettings
from runtime.durations import Duration
from runtime.settings import ProcessSettings


class ApiSettings(DatabaseSettings, ProcessSettings):
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_workers: int = Field(1, ge=1, description="uvicorn worker processes.")
    outbox_notify_min_interval: float = Field(
        0.002, ge=0, le=1, description="Seconds between two wake-ups this process sends."
    )
    api_access_log: bool = Field(True, description="Log one line per request.")
    # Connection limits (api.connection_limits): what a client can hold before its
    # request reaches the app, and so before its API key is checked.
    api_max_header_bytes: int = Field(
        16_384,
        ge=1024,
        description="Largest request head (request line and headers) in bytes; past it, 431.",
    )
    api_header_timeout: Duration = Field(
        5.0,
        gt=0,
        description=(
            "Time a connection has to send a complete request head, from its opening (or "
            "the head's first byte on a kept-alive connection); then 408 and closed."
        ),
    )
    api_body_timeout: Duration = Field(
        30.0, gt=0, description="Time a request body has to arrive in full after its head."
    )
    api_keep_alive_timeout: Duration = Field(
        5.0, gt=0, description="Idle time after a response before the connection is closed."
    )
    api_concurrency_limit: int = Field(
        512,
        ge=1,
        description=(
            "Connections (idle ones included) and requests in flight per worker past "
            "which a request is answered 503 (uvicorn's limit_concurrency)."
        ),
    )
    default_max_attempts: int = Field(3, ge=1, le=100)
    max_max_attempts: int = Field(25, ge=1, description="Upper bound a client may ask for.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated API keys, sent as `Authorization: Bearer <key>`; several let "
            "keys rotate. Empty turns authentication off."
        ),
    )
    metrics_require_auth: bool = Field(False, description="/metrics asks for an API key too.")
    max_body_bytes: int = Field(
        1_048_576, ge=0, description="Largest request body in bytes; past it, 413."
    )
    max_payload_string: int = Field(
        65_536, ge=1, description="Longest string (value or key) in a payload, in characters."
    )
    max_schedule_delay: Duration = Field(
        365 * 86400.0,
        gt=0,
        # a century: further would overflow date arithmetic (and Postgres' years)
        le=100 * 365.25 * 86400,
        description="How far ahead `run_at`/`delay_seconds` may schedule a task (e.g. 30d).",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value
