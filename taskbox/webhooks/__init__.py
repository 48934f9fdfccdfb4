"""Webhooks shared by the api (subscriptions and their checks) and the relay (delivery):
the events, the destination rules that keep deliveries off internal networks
(``destinations``), Standard Webhooks signing (``signing``) and the settings. Imports no
other Taskbox package but ``runtime``."""

from taskbox.webhooks.destinations import (
    AllowList,
    InvalidWebhookUrl,
    Target,
    UnsafeDestination,
    check_url,
    refusal_reason,
    resolve_destination,
)
from taskbox.webhooks.events import EVENTS, WEBHOOK_CHANNEL
from taskbox.webhooks.signing import new_secret, secret_key, sign

__all__ = [
    "EVENTS",
    "WEBHOOK_CHANNEL",
    "AllowList",
    "InvalidWebhookUrl",
    "Target",
    "UnsafeDestination",
    "check_url",
    "new_secret",
    "refusal_reason",
    "resolve_destination",
    "secret_key",
    "sign",
]
