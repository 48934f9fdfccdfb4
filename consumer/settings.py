"""Settings of the consumer process."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from taskbox.broker.settings import BrokerSettings
from taskbox.consumer.attempt import DEFAULT_MAX_RESULT_BYTES
from taskbox.db.settings import DatabaseSettings
from taskbox.runtime.settings import MetricsSettings, ProcessSettings, TaskTypeSettings


class ConsumerSettings(
    DatabaseSettings, BrokerSettings, ProcessSettings, TaskTypeSettings, MetricsSettings
):
    consumer_prefetch: int = Field(200, ge=1, le=65535, description="Unacked messages held.")
    consumer_concurrency: int = Field(100, ge=1, description="Handlers running at once.")
    handler_timeout: float = Field(300.0, gt=0, description="Default seconds per attempt.")
    handler_threads: int = Field(
        16,
        ge=1,
        description="Threads that run plain def handlers; a sync task waits for a free "
        "one (its timeout running). A thread past its timeout runs on, holding its slot.",
    )
    handler_cancel_grace: float = Field(
        10.0,
        gt=0,
        description="Seconds a handler past its timeout, or asked to stop, gets to end "
        "before its attempt is written without it (the coroutine is left running, detached).",
    )
    max_result_bytes: int = Field(
        DEFAULT_MAX_RESULT_BYTES,
        ge=1,
        description="Largest result a handler may return, in bytes of JSON; a larger one "
        "fails its attempt (UnserializableResult).",
    )
    heartbeat_interval: float = Field(5.0, gt=0, description="Seconds between heartbeats.")
    task_stale_after: float = Field(
        30.0, gt=0, description="Heartbeat age after which a running task counts as abandoned."
    )
    rescue_interval: float = Field(10.0, gt=0, description="Seconds between stuck-task sweeps.")
    retry_base_delay: float = Field(1.0, gt=0, description="Backoff before the second attempt.")
    retry_max_delay: float = Field(300.0, gt=0, description="Longest backoff between attempts.")
    shutdown_grace: float = Field(
        30.0, ge=0, description="Seconds running handlers get to finish on SIGTERM."
    )
    consumer_metrics_port: int = Field(
        9102, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz; 0 turns it off."
    )

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.task_stale_after <= 2 * self.heartbeat_interval:
            raise ValueError(
                "TASK_STALE_AFTER must exceed twice HEARTBEAT_INTERVAL, or live tasks get rescued"
            )
        return self
