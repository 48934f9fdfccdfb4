"""RabbitMQ settings shared by relay and consumer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings

from db.settings import ENV_CONFIG


class BrokerSettings(BaseSettings):
    model_config = ENV_CONFIG

    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672/", description="RabbitMQ URL.")
    exchange_name: str = Field("taskbox", min_length=1)
    queue_name: str = Field("taskbox.tasks", min_length=1)
    dead_letter_exchange: str = Field("taskbox.dlx", min_length=1)
    dead_letter_queue: str = Field("taskbox.dead", min_length=1)
    queue_type: Literal["classic", "quorum"] = Field(
        "classic", description="quorum for a clustered broker."
    )
