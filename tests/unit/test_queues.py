"""Named queues without servers: names, CONSUMER_QUEUES, the registry's queues, the
api's choice of queue and the relay's routing of each row."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from taskbox.api.schemas import TaskCreate
from taskbox.api.service import InvalidRequest, TaskService
from taskbox.consumer.settings import ConsumerSettings, ServedQueue, parse_consumer_queues
from taskbox.relay.publisher import OutboxPublisher
from taskbox.runtime.queues import (
    DEFAULT_QUEUE,
    InvalidQueueName,
    amqp_queue_name,
    check_queue_name,
)
from taskbox.tasktypes import TaskRegistry
from tests.unit.test_publisher import FakeChannel, FakeRobustChannel, outbox_row


class Empty(BaseModel):
    pass


def handler(payload: Empty, ctx: Any) -> None:
    return None


@pytest.mark.parametrize("name", ["default", "media", "a", "bulk-2", "x_y", "9lives", "q" * 64])
def test_valid_queue_names(name: str) -> None:
    assert check_queue_name(name) == name


@pytest.mark.parametrize("name", ["", "Media", "-x", "_x", "a.b", "a b", "q" * 65, "é", "a/b"])
def test_invalid_queue_names_say_the_rule(name: str) -> None:
    with pytest.raises(InvalidQueueName, match="lowercase letters, digits"):
        check_queue_name(name)


def test_the_default_queue_keeps_queue_name_and_another_gets_a_suffix() -> None:
    assert amqp_queue_name("taskbox.tasks", DEFAULT_QUEUE) == "taskbox.tasks"
    assert amqp_queue_name("taskbox.tasks", "media") == "taskbox.tasks.media"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", [ServedQueue("default", 7)]),
        ("media:4,default:50", [ServedQueue("media", 4), ServedQueue("default", 50)]),
        (" media : 4 , bulk ", [ServedQueue("media", 4), ServedQueue("bulk", 7)]),
        ("default", [ServedQueue("default", 7)]),
    ],
)
def test_consumer_queues_are_parsed_with_their_concurrency(
    value: str, expected: list[ServedQueue]
) -> None:
    assert parse_consumer_queues(value, 7) == expected


def test_consumer_queues_default_to_consumer_concurrency() -> None:
    settings = ConsumerSettings(consumer_concurrency=12, consumer_queues="media,bulk:3")
    assert settings.served_queues == [ServedQueue("media", 12), ServedQueue("bulk", 3)]
    assert ConsumerSettings(consumer_concurrency=5).served_queues == [ServedQueue("default", 5)]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("media:x", "the concurrency after ':' must be a whole number >= 1, not 'x'"),
        ("media:-1", "the concurrency must be >= 1"),
        ("Media:2", "invalid queue name 'Media'"),
        ("media,media", "names queue 'media' twice"),
        (",", "has an empty entry"),
    ],
)
def test_a_bad_consumer_queues_value_is_refused_naming_the_entry(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ConsumerSettings(consumer_queues=value)


def test_a_type_declares_its_queue_or_queues_the_first_its_own() -> None:
    registry = TaskRegistry()
    registry.register("plain", Empty, handler)
    registry.register("resize", Empty, handler, queue="media")
    registry.register("thumb", Empty, handler, queue=("media", "bulk"))
    assert registry.get("plain").queues == ("default",)  # type: ignore[union-attr]
    assert registry.get("thumb").queue == "media"  # type: ignore[union-attr]
    assert registry.queues() == ["bulk", "default", "media"]


@pytest.mark.parametrize("queue", ["Media", "", ()])
def test_a_registration_with_a_bad_queue_is_refused(queue: Any) -> None:
    with pytest.raises(ValueError, match="queue"):
        TaskRegistry().register("x", Empty, handler, queue=queue)


def service(registry: TaskRegistry) -> TaskService:
    return TaskService(
        store=None,  # type: ignore[arg-type]  # validate() never reaches the store
        registry=registry,
        default_max_attempts=3,
        max_max_attempts=25,
        wake_relay=lambda: None,
    )


def test_a_create_goes_to_its_types_queue_or_one_it_names_of_the_types() -> None:
    registry = TaskRegistry()
    registry.register("thumb", Empty, handler, queue=("media", "bulk"))
    tasks = service(registry)
    assert tasks.validate(TaskCreate(type="thumb")).queue == "media"
    assert tasks.validate(TaskCreate(type="thumb", queue="bulk")).queue == "bulk"
    with pytest.raises(InvalidRequest) as refused:
        tasks.validate(TaskCreate(type="thumb", queue="default"))
    assert refused.value.errors == [
        {
            "loc": ["body", "queue"],
            "msg": "task type 'thumb' does not run in queue 'default'; allowed queues: media, bulk",
            "type": "queue_not_allowed",
        }
    ]
    with pytest.raises(InvalidRequest, match=re.escape("invalid queue name 'a.b'")):
        tasks.validate(TaskCreate(type="thumb", queue="a.b"))


class Declarer:
    def __init__(self) -> None:
        self.known = {"default"}
        self.ensured: list[str] = []

    def declared(self, queue: str) -> bool:
        return queue in self.known

    def forget(self, queue: str) -> None:
        self.known.discard(queue)

    async def ensure(self, queue: str) -> None:
        self.ensured.append(queue)
        self.known.add(queue)


async def test_the_relay_routes_each_row_to_its_queue_declaring_a_new_one_first() -> None:
    channel = FakeChannel()
    declarer = Declarer()
    publisher = OutboxPublisher(
        FakeRobustChannel(channel),
        "taskbox",
        "taskbox.tasks",
        timeout=1.0,
        retry_delay=lambda attempt: 1.0,
        declarer=declarer,
    )
    rows = [outbox_row(1), {**outbox_row(2), "queue": "media"}, outbox_row(3)]
    report = await publisher.publish_batch(rows)
    assert report.published == [1, 2, 3]
    assert declarer.ensured == ["media"]
    assert [p.routing_key for p in channel.publishes] == [
        "taskbox.tasks",
        "taskbox.tasks.media",
        "taskbox.tasks",
    ]
    await publisher.publish_batch([{**outbox_row(4), "queue": "media"}])
    assert declarer.ensured == ["media"]  # once per process
