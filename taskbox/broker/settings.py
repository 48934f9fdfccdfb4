"""RabbitMQ settings shared by relay and consumer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings

from taskbox.broker.nodes import parse_amqp_urls
from taskbox.runtime.settings import ENV_CONFIG


class BrokerSettings(BaseSettings):
    model_config = ENV_CONFIG

    amqp_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/",
        description="RabbitMQ URL, or a cluster's nodes' URLs separated by commas, tried in "
        "turn on every connect and reconnect (broker.nodes).",
    )
    exchange_name: str = Field("taskbox", min_length=1)
    queue_name: str = Field("taskbox.tasks", min_length=1)
    dead_letter_exchange: str = Field("taskbox.dlx", min_length=1)
    dead_letter_queue: str = Field("taskbox.dead", min_length=1)
    queue_type: Literal["classic", "quorum"] = Field(
        "classic", description="quorum for a clustered broker."
    )
    queue_delivery_limit: int | None = Field(
        20,
        ge=1,
        description="Quorum queues only (x-delivery-limit): deliveries of one message before "
        "RabbitMQ dead-letters it; the consumers' dead-letter watch then sends its task "
        "again through the outbox. Empty: the broker's default (none on 3.x, 20 on 4.x).",
    )
    queue_dead_letter_strategy: Literal["at-least-once", "at-most-once"] = Field(
        "at-least-once",
        description="Quorum queues only (x-dead-letter-strategy): at-least-once keeps a "
        "dead-lettered message in the task queue until the dead-letter queues confirmed "
        "it (with x-overflow=reject-publish, which it requires), so a message the broker "
        "gives up on is never dropped on the way to the dead-letter watch; at-most-once "
        "(the broker's default) sends neither argument, for a queue declared without them.",
    )
    queue_max_priority: int | None = Field(
        None,
        ge=0,
        le=9,
        description="Priority levels of the task queue (x-max-priority): 9 for a classic "
        "queue unless set; 0 turns priorities off. RabbitMQ 3.x quorum queues have none.",
    )

    amqp_pipeline: bool = Field(
        True,
        description="Publish (relay) and settle messages (consumer) in batches written "
        "straight to aiormq's channel (broker.pipeline), which relies on aiormq's internals "
        "as the locked minor version keeps them. false: aio-pika's public API, one message "
        "at a time: slower, for an aiormq version the pipeline does not support.",
    )

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        parse_amqp_urls(value)
        return value

    @field_validator("queue_max_priority", "queue_delivery_limit", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # QUEUE_MAX_PRIORITY= (as in .env.example) means "the queue type's default"; so
        # does an empty QUEUE_DELIVERY_LIMIT (the broker's).
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _priorities_need_a_classic_queue(self) -> BrokerSettings:
        if self.queue_type == "quorum" and self.queue_max_priority:
            raise ValueError(
                "QUEUE_MAX_PRIORITY must be 0 (or unset) with QUEUE_TYPE=quorum: RabbitMQ 3.x "
                "quorum queues do not support priorities"
            )
        return self

    @property
    def amqp_urls(self) -> tuple[str, ...]:
        """The nodes of AMQP_URL, in the order given (one for a single broker)."""
        return parse_amqp_urls(self.amqp_url)

    @property
    def max_priority(self) -> int:
        """The x-max-priority the task queue is declared with; 0 for none."""
        if self.queue_max_priority is not None:
            return self.queue_max_priority
        # Task priorities run 0-9; a classic queue honours them all by default.
        return 9 if self.queue_type == "classic" else 0

    @property
    def dead_letter_watch_queue(self) -> str:
        """The consumers' copy of every dead letter (the DLX is a fanout), taken to send
        a dead-lettered task again; DEAD_LETTER_QUEUE keeps its copy for operators."""
        return f"{self.dead_letter_queue}.watch"
