"""Settings of the relay process."""

from __future__ import annotations

from pydantic import Field

from taskbox.broker.settings import BrokerSettings
from taskbox.db.settings import DatabaseSettings
from taskbox.runtime.durations import Duration, OptionalDuration
from taskbox.runtime.settings import MetricsSettings, ProcessSettings, TaskTypeSettings
from taskbox.webhooks.settings import WebhookDeliverySettings

_WEEK = 7 * 86400.0


class RelaySettings(
    DatabaseSettings,
    BrokerSettings,
    ProcessSettings,
    MetricsSettings,
    TaskTypeSettings,
    WebhookDeliverySettings,
):
    relay_batch_size: int = Field(500, ge=1, le=10_000, description="Rows claimed per transaction.")
    relay_concurrency: int = Field(
        2, ge=1, le=16, description="Batches in flight at once while draining a backlog."
    )
    relay_poll_interval: float = Field(
        1.0, gt=0, description="Seconds between polls when no NOTIFY arrives."
    )
    relay_listen: bool = Field(True, description="Wake on NOTIFY; false leaves only the poll.")
    relay_listen_check_interval: float = Field(
        5.0, gt=0, description="Seconds between the LISTEN connection's self-checks."
    )
    relay_publish_timeout: float = Field(
        10.0, gt=0, description="Seconds to write a batch, then to wait for its confirms."
    )
    relay_retry_base_delay: float = Field(1.0, gt=0, description="First backoff of a refused row.")
    relay_retry_max_delay: float = Field(
        60.0, gt=0, description="Longest backoff of a refused row."
    )
    relay_metrics_port: int = Field(
        9101, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz; 0 turns it off."
    )
    relay_backlog_interval: float = Field(
        5.0, gt=0, description="Seconds between refreshes of the outbox backlog gauges."
    )
    outbox_retention: Duration = Field(
        _WEEK, gt=0, description="Age after which published outbox rows are deleted."
    )
    task_retention: OptionalDuration = Field(
        None, gt=0, description="Age after which finished tasks are deleted; None keeps them."
    )
    retention_interval: Duration = Field(
        60.0, ge=0, description="Seconds between housekeeping sweeps; 0 turns the loop off."
    )
    retention_batch: int = Field(
        1000, ge=1, le=100_000, description="Rows deleted per statement by a sweep."
    )
    # Periodic tasks (relay.scheduler): every relay is a candidate, one leads.
    scheduler_enabled: bool = Field(
        True, description="Be a scheduler candidate; false: this relay never fires schedules."
    )
    scheduler_poll_interval: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Longest sleep of the leading scheduler: how soon a new or edited "
        "schedule is seen.",
    )
    scheduler_leader_retry: float = Field(
        2.0,
        gt=0,
        le=60,
        description="Seconds between a standby scheduler's tries to take the lead: the "
        "bound on a hand-over after the leader dies.",
    )
    schedule_catch_up_max: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Most missed ticks a catch_up=all schedule creates after an outage.",
    )
    default_max_attempts: int = Field(
        3, ge=1, le=100, description="max_attempts of a code schedule's tasks whose type sets none."
    )
