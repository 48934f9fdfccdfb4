"""broker/messages.py: the task message the relay builds and the consumer parses."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from taskbox.broker.messages import CONTENT_TYPE, MalformedMessage, TaskMessage, encode, parse

TASK_ID = uuid.UUID("0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11")


def test_encode_then_parse_round_trips() -> None:
    message = encode(
        outbox_id=42,
        kind="task.retry",
        body={"task_id": str(TASK_ID), "type": "echo", "priority": 3},
        headers={},
    )
    assert parse(message.body) == TaskMessage(
        task_id=TASK_ID, type="echo", outbox_id=42, kind="task.retry"
    )


def test_encode_sets_the_amqp_properties() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    message = encode(
        outbox_id=7,
        kind="task.created",
        body={"task_id": str(TASK_ID), "type": "sleep", "priority": 9, "ignored": True},
        headers={"traceparent": "00-abc-def-01"},
    )
    assert orjson.loads(message.body) == {
        "task_id": str(TASK_ID),
        "type": "sleep",
        "outbox_id": 7,
        "kind": "task.created",
    }
    properties = message.properties
    assert properties.delivery_mode == 2  # persistent
    assert properties.content_type == CONTENT_TYPE == "application/json"
    assert properties.message_id == "7"
    assert properties.message_type == "task.created"
    assert properties.priority == 9
    assert properties.headers == {"traceparent": "00-abc-def-01"}
    assert properties.timestamp is not None
    # AMQP timestamps have whole seconds.
    assert before <= properties.timestamp <= datetime.now(UTC) + timedelta(seconds=1)


def test_encode_defaults_priority_to_zero_and_no_headers() -> None:
    message = encode(
        outbox_id=1, kind="task.created", body={"task_id": str(TASK_ID), "type": "x"}, headers={}
    )
    assert message.properties.priority == 0
    assert message.properties.headers is None


def test_parse_ignores_unknown_fields_and_defaults_kind() -> None:
    body = orjson.dumps(
        {"task_id": str(TASK_ID), "type": "echo", "outbox_id": 5, "future_field": [1]}
    )
    assert parse(body) == TaskMessage(
        task_id=TASK_ID, type="echo", outbox_id=5, kind="task.created"
    )


# Each message names where the problem is and pydantic's headline; the regexes leave
# pydantic's finer wording (positions, hints) free to change between versions.
@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"\xff\xfe\x00\x81", r"body: Invalid JSON: expected value at line 1 column 1"),
        (b"", r"body: Invalid JSON: EOF while parsing a value at line 1 column 0"),
        (b"hello", r"body: Invalid JSON: expected value at line 1 column 1"),
        (b'{"task_id": ', r"body: Invalid JSON: EOF while parsing a value at line 1 column 12"),
        (b"[1, 2]", r"body: Input should be an object"),
        (b'"a string"', r"body: Input should be an object"),
        (b'{"type": "echo", "outbox_id": 1}', r"task_id: Field required"),
        (
            b'{"task_id": "not-a-uuid", "type": "echo", "outbox_id": 1}',
            r"task_id: Input should be a valid UUID, invalid character: .*found `n` at 0",
        ),
        (
            b'{"task_id": "0b6f5a8e-3c1d-4a51-9d7e", "type": "echo", "outbox_id": 1}',
            r"task_id: Input should be a valid UUID, invalid group count: .*",
        ),
        (
            b'{"task_id": 12, "type": "echo", "outbox_id": 1}',
            r"task_id: UUID input should be a string, bytes or UUID object",
        ),
        (
            b'{"task_id": "0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11", "type": "echo"}',
            r"outbox_id: Field required",
        ),
        (
            b'{"task_id": "0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11", "outbox_id": 1}',
            r"type: Field required",
        ),
        (
            b'{"task_id": "0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11", "type": "e", "outbox_id": "x"}',
            r"outbox_id: Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            b'{"task_id": "0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11", "type": "e",'
            b' "outbox_id": 9223372036854775808}',
            r"outbox_id: Input should be less than or equal to 9223372036854775807",
        ),
        (
            b'{"task_id": "0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11", "type": "e", "outbox_id": 0}',
            r"outbox_id: Input should be greater than or equal to 1",
        ),
    ],
    ids=[
        "garbage-bytes",
        "empty",
        "not-json",
        "truncated-json",
        "json-array",
        "json-string",
        "no-task-id",
        "bad-uuid",
        "short-uuid",
        "uuid-not-a-string",
        "no-outbox-id",
        "no-type",
        "outbox-id-not-int",
        "outbox-id-past-bigint",
        "outbox-id-zero",
    ],
)
def test_parse_rejects_with_a_precise_message(body: bytes, error: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        parse(body)
    assert re.fullmatch(error, str(caught.value)), str(caught.value)
    # The pydantic error is replaced, not chained: the dead-letter log stays one line.
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ is True


def test_malformed_message_is_a_value_error() -> None:
    assert issubclass(MalformedMessage, ValueError)
