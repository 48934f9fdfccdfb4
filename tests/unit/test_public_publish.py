"""broker.public.to_aio_pika: the fallback publish path sends every AMQP property the
relay's message has, as the pipeline would."""

from __future__ import annotations

from datetime import UTC, datetime

from pamqp.commands import Basic

from taskbox.broker import messages
from taskbox.broker.pipeline import Message
from taskbox.broker.public import to_aio_pika

FIELDS = [
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "message_type",
    "user_id",
    "app_id",
]


def test_every_property_is_carried_over() -> None:
    original = Basic.Properties(
        content_type="application/json",
        content_encoding="utf-8",
        headers={"traceparent": "00-abc-def-01", "n": 7},
        delivery_mode=2,
        priority=5,
        correlation_id="corr",
        reply_to="replies",
        expiration="60000",
        message_id="1201",
        timestamp=datetime(2026, 12, 7, 15, 0, tzinfo=UTC),
        message_type="task.created",
        user_id="guest",
        app_id="taskbox",
    )
    sent = to_aio_pika(Message(b"{}", original)).properties
    for name in FIELDS:
        assert getattr(sent, name) == getattr(original, name), name
    # and nothing unset grows a value (FIELDS is every field pamqp has but cluster_id)
    assert set(FIELDS) | {"cluster_id"} == set(Basic.Properties.attributes())


def test_the_relays_own_message_is_unchanged() -> None:
    body, properties = messages.encode(
        outbox_id=9,
        kind="task.created",
        body={"task_id": "t", "type": "echo", "priority": 3},
        headers={"traceparent": "00-x-y-01"},
    )
    sent = to_aio_pika(Message(body, properties))
    assert sent.body == body
    for name in FIELDS:
        assert getattr(sent.properties, name) == getattr(properties, name), name
