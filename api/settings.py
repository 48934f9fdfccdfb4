"""Settings of the API process."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from taskbox.db.settings import DatabaseSettings
from taskbox.runtime.durations import Duration
from taskbox.runtime.settings import ProcessSettings, TaskTypeSettings
from taskbox.webhooks.settings import WebhookApiSettings


class ApiSettings(DatabaseSettings, ProcessSettings, TaskTypeSettings, WebhookApiSettings):
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_workers: int = Field(1, ge=1, description="uvicorn worker processes.")
    outbox_notify_min_interval: float = Field(
        0.002, ge=0, le=1, description="Seconds between two wake-ups this process sends."
    )
    api_access_log: bool = Field(True, description="Log one line per request.")
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated addresses or networks (CIDR) of the proxies whose "
            "X-Forwarded-For and X-Forwarded-Proto the api believes, or * for any peer. "
            "Empty believes no one: the headers are ignored."
        ),
    )
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
    # Waiting for results (api.task_events, api.waiting).
    task_wait_max: Duration = Field(
        60.0,
        gt=0,
        le=3600,
        description="Longest `?wait=` a request may ask for, in seconds; above it, 422.",
    )
    task_wait_max_waiters: int = Field(
        256,
        ge=1,
        description=(
            "Long polls and event streams one api process serves at once; past it, 503 with "
            "Retry-After. Each holds a connection: keep it below API_CONCURRENCY_LIMIT."
        ),
    )
    task_events_heartbeat: Duration = Field(
        15.0,
        gt=0,
        description="Seconds between two comment lines on a quiet event stream (proxies "
        "close idle connections).",
    )
    task_events_max_stream: Duration = Field(
        600.0,
        gt=0,
        description="How long an event stream stays open before the api ends it (the "
        "client reconnects, as EventSource does by itself).",
    )
    task_events_check_interval: Duration = Field(
        5.0,
        gt=0,
        description="Seconds between two self-checks of the api's task events connection.",
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
    allow_unauthenticated: bool = Field(
        False,
        description="Serve without API keys on an address beyond loopback (API_HOST); "
        "without it such an api refuses to start.",
    )
    metrics_require_auth: bool = Field(False, description="/metrics asks for an API key too.")
    max_body_bytes: int = Field(
        1_048_576, ge=0, description="Largest request body in bytes; past it, 413."
    )
    max_page_bytes: int = Field(
        1_048_576,
        ge=1,
        description="Most bytes of payload, result and error (JSON) in one page of "
        "`GET /api/v1/tasks?view=full`; the first task of a page comes even when larger.",
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

    @field_validator("api_keys", "forwarded_allow_ips", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_fit_a_header(cls, value: list[SecretStr]) -> list[SecretStr]:
        for number, key in enumerate(value, 1):
            if any(char.isspace() or not char.isprintable() for char in key.get_secret_value()):
                # Which key, never what it holds.
                raise ValueError(
                    f"API_KEYS: key {number} of {len(value)} holds whitespace or a control "
                    "character, which a bearer key in an Authorization header cannot carry"
                )
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies_are_addresses(cls, value: list[str]) -> list[str]:
        # uvicorn takes an entry that is not an address for a literal it compares the
        # peer with, and * beside other entries for such a literal too: either mistake
        # would silently believe no proxy.
        if "*" in value and value != ["*"]:
            raise ValueError("FORWARDED_ALLOW_IPS: * trusts every peer; give it alone")
        for entry in value:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry)  # an address is a network of one
            except ValueError:
                raise ValueError(
                    f"FORWARDED_ALLOW_IPS: {entry!r} is not an IP address or network "
                    "(e.g. 10.0.0.5 or 10.0.0.0/24)"
                ) from None
        return value
