"""WEBHOOK_* settings: the api reads the destination rules and the callback secret
(to refuse what could never be sent), the relay all of them (it delivers)."""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode

from taskbox.runtime.durations import Duration
from taskbox.runtime.settings import ENV_CONFIG
from taskbox.webhooks.destinations import AllowList
from taskbox.webhooks.signing import secret_key


class WebhookSettings(BaseSettings):
    """What both the api and the relay read: where webhooks may go, the callback secret."""

    model_config = ENV_CONFIG

    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated host names and networks (CIDR or an address) that "
        "webhooks may reach although they are loopback, private, link-local or otherwise "
        "internal. Empty: only global addresses.",
    )
    webhook_callback_secret: SecretStr | None = Field(
        None,
        description="The whsec_ secret that signs per-task callback_url deliveries; without "
        "it a task with a callback_url is refused.",
    )

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [entry.strip() for entry in value.split(",") if entry.strip()]
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _entries(cls, value: list[str]) -> list[str]:
        for entry in value:
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(
                        f"WEBHOOK_ALLOWED_HOSTS: {entry!r} is not a network (e.g. 10.0.0.0/8)"
                    ) from None
        return value

    @field_validator("webhook_callback_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_callback_secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                secret_key(value.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"WEBHOOK_CALLBACK_SECRET: {exc}") from None
        return value

    @property
    def allow_list(self) -> AllowList:
        return AllowList(self.webhook_allowed_hosts)


class WebhookApiSettings(WebhookSettings):
    """The api's: the destination rules, and the grace of a secret rotation."""

    webhook_rotation_grace: Duration = Field(
        86400.0,
        ge=0,
        description="After a secret rotation, how long deliveries are signed with the "
        "previous secret as well.",
    )


class WebhookDeliverySettings(WebhookSettings):
    """The relay's: how its delivery worker sends."""

    webhook_timeout: Duration = Field(
        10.0, gt=0, le=300, description="Seconds a delivery attempt may take in all."
    )
    webhook_max_attempts: int = Field(
        8, ge=1, le=100, description="Attempts before a delivery is failed (replayable)."
    )
    webhook_retry_base_delay: Duration = Field(
        5.0, gt=0, description="Backoff after a delivery's first failed attempt; it doubles."
    )
    webhook_retry_max_delay: Duration = Field(
        3600.0, gt=0, description="Longest backoff between two attempts of a delivery."
    )
    webhook_concurrency: int = Field(
        16, ge=1, le=1000, description="Deliveries in flight at once per relay."
    )
    webhook_poll_interval: Duration = Field(
        1.0, gt=0, description="Seconds between looks for due deliveries without a NOTIFY."
    )
    webhook_delivery: bool = Field(
        True, description="Run the delivery worker in this relay; false: another one does."
    )
