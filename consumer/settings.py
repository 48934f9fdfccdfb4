"""Settings of the consumer process."""

from __future__ import annotations

from typing import NamedTuple, Self

from pydantic import Field, field_validator, model_validator

from taskbox.broker.settings import BrokerSettings
from taskbox.consumer.attempt import DEFAULT_MAX_RESULT_BYTES
from taskbox.db.settings import DatabaseSettings
from taskbox.runtime.queues import DEFAULT_QUEUE, InvalidQueueName, check_queue_name
from taskbox.runtime.settings import MetricsSettings, ProcessSettings, TaskTypeSettings


class ServedQueue(NamedTuple):
    name: str
    concurrency: int  # handlers of this queue running at once in this process


def parse_consumer_queues(value: str, default_concurrency: int) -> list[ServedQueue]:
    """CONSUMER_QUEUES: ``media:4,default:50``, queue names each with its concurrency
    (CONSUMER_CONCURRENCY when left out); empty: ``default`` alone. Raises ValueError
    naming the entry at fault."""
    served: list[ServedQueue] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            if value.strip():
                raise ValueError(f"CONSUMER_QUEUES has an empty entry in {value!r}")
            continue
        name, colon, count = entry.partition(":")
        name = name.strip()
        try:
            check_queue_name(name)
        except InvalidQueueName as exc:
            raise ValueError(f"CONSUMER_QUEUES entry {entry!r}: {exc}") from None
        concurrency = default_concurrency
        if colon:
            try:
                concurrency = int(count.strip())
            except ValueError:
                raise ValueError(
                    f"CONSUMER_QUEUES entry {entry!r}: the concurrency after ':' must be a "
                    f"whole number >= 1, not {count.strip()!r}"
                ) from None
            if concurrency < 1:
                raise ValueError(f"CONSUMER_QUEUES entry {entry!r}: the concurrency must be >= 1")
        if any(queue.name == name for queue in served):
            raise ValueError(f"CONSUMER_QUEUES names queue {name!r} twice")
        served.append(ServedQueue(name, concurrency))
    return served or [ServedQueue(DEFAULT_QUEUE, default_concurrency)]


class ConsumerSettings(
    DatabaseSettings, BrokerSettings, ProcessSettings, TaskTypeSettings, MetricsSettings
):
    consumer_prefetch: int = Field(200, ge=1, le=65535, description="Unacked messages held.")
    consumer_concurrency: int = Field(100, ge=1, description="Handlers running at once.")
    consumer_queues: str = Field(
        "",
        description="Queues served, each with its concurrency: media:4,default:50 (a name "
        "alone takes CONSUMER_CONCURRENCY). Empty: default, with CONSUMER_CONCURRENCY.",
    )
    queue_pause_check_interval: float = Field(
        1.0,
        gt=0,
        description="Seconds between checks of which served queues are paused: how soon "
        "a pause stops this consumer taking a queue's messages, and a resume restarts it.",
    )
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

    @field_validator("consumer_queues")
    @classmethod
    def _queues(cls, value: str) -> str:
        parse_consumer_queues(value, 1)  # the names and counts; concurrency comes later
        return value

    @property
    def served_queues(self) -> list[ServedQueue]:
        return parse_consumer_queues(self.consumer_queues, self.consumer_concurrency)

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.task_stale_after <= 2 * self.heartbeat_interval:
            raise ValueError(
                "TASK_STALE_AFTER must exceed twice HEARTBEAT_INTERVAL, or live tasks get rescued"
            )
        return self
