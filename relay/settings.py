"""Settings of the relay process."""

from __future__ import annotations

from pydantic import Field

from broker.settings import BrokerSettings
from db.settings import DatabaseSettings
from runtime.settings import ProcessSettings


class RelaySettings(DatabaseSettings, BrokerSettings, ProcessSettings):
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
    relay_publish_timeout: float = Field(10.0, gt=0, description="Seconds to wait for a confirm.")
    relay_retry_base_delay: float = Field(1.0, gt=0, description="First backoff of a refused row.")
    relay_retry_max_delay: float = Field(
        60.0, gt=0, description="Longest backoff of a refused row."
    )
