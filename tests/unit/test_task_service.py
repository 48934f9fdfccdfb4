"""api/service.py TaskService over an in-memory TaskStore: the rules, without Postgres."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskbox.api import pagination
from taskbox.api.batch import UnreadableBody
from taskbox.api.schemas import TaskCreate
from taskbox.api.service import (
    Cancellation,
    IdempotencyConflict,
    InvalidRequest,
    TaskFinished,
    TaskNotFound,
    TaskRow,
    TaskService,
)
from taskbox.db.states import CANCEL_LATER, CANCEL_NOW, TaskStatus
from taskbox.db.tasks import CancelOutcome, NewTask, Page, TaskFilter
from taskbox.tasktypes import TaskContext, TaskRegistry, load_registry

T0 = datetime(2026, 1, 2, 3, 4, 5, 600_000, tzinfo=UTC)


# -- test task types --------------------------------------------------------------------


class ResizePayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    width: int = Field(gt=0)
    height: int = 100
    fmt: Literal["png", "jpeg"] = "png"


async def resize(payload: ResizePayload, ctx: TaskContext) -> dict[str, int]:
    return {"pixels": payload.width * payload.height}


class NoPayload(BaseModel):
    pass


async def noop(payload: NoPayload, ctx: TaskContext) -> None:
    return None


class AliasedPayload(BaseModel):
    """A payload whose JSON name is a Python keyword, the usual reason for an alias."""

    sender: str = Field(alias="from")


async def aliased(payload: AliasedPayload, ctx: TaskContext) -> str:
    return payload.sender


# -- the fake store ---------------------------------------------------------------------


@dataclass
class FakeTaskStore:
    """Implements the TaskStore protocol with the semantics of db.tasks over a dict."""

    events: list[str]
    rows: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    created: list[NewTask] = field(default_factory=list)
    list_calls: list[tuple[TaskFilter, int, tuple[datetime, uuid.UUID] | None]] = field(
        default_factory=list
    )
    full_list_calls: list[int] = field(default_factory=list)  # the budget of each
    fail_create: Exception | None = None
    headers: list[dict[str, Any]] = field(default_factory=list)
    keys: dict[str, TaskRow] = field(default_factory=dict)

    def add(self, status: TaskStatus, created_at: datetime = T0) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": uuid.uuid4(),
            "type": "resize",
            "payload": {},
            "status": status.value,
            "priority": 0,
            "attempts": 0,
            "max_attempts": 3,
            "result": None,
            "error": None,
            "cancel_requested": False,
            "created_at": created_at,
            "updated_at": created_at,
            "started_at": None,
            "finished_at": None,
            "run_at": None,
            "queue": "default",
        }
        self.rows[row["id"]] = row
        return row

    async def create_once(
        self, task: NewTask, headers: dict[str, Any], idempotency_key: str
    ) -> tuple[TaskRow, bool]:
        if idempotency_key in self.keys:
            return self.keys[idempotency_key], False
        row = await self.create(task, headers)
        self.keys[idempotency_key] = row
        return row, True

    async def create_many(self, tasks: list[NewTask], headers: dict[str, Any]) -> list[TaskRow]:
        return [await self.create(task, headers) for task in tasks]

    async def create(self, task: NewTask, headers: dict[str, Any]) -> TaskRow:
        self.events.append("store.create")
        if self.fail_create is not None:
            raise self.fail_create
        self.created.append(task)
        self.headers.append(headers)
        row = self.add(TaskStatus.NEW, created_at=T0 + timedelta(seconds=len(self.rows)))
        row.update(
            type=task.type,
            payload=task.payload,
            priority=task.priority,
            max_attempts=task.max_attempts,
            run_at=task.run_at,
            queue=task.queue,
        )
        return row

    async def get(self, task_id: uuid.UUID) -> TaskRow | None:
        return self.rows.get(task_id)

    async def status(self, task_id: uuid.UUID) -> TaskRow | None:
        row = self.rows.get(task_id)
        if row is None:
            return None
        return {k: row[k] for k in ("id", "status", "updated_at")}

    async def list(
        self,
        filters: TaskFilter,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
    ) -> Page:
        self.list_calls.append((filters, limit, after))
        rows = sorted(self.rows.values(), key=lambda r: (r["created_at"], r["id"]), reverse=True)
        if filters.statuses:
            rows = [r for r in rows if r["status"] in filters.statuses]
        if filters.type is not None:
            rows = [r for r in rows if r["type"] == filters.type]
        if after is not None:
            rows = [r for r in rows if (r["created_at"], r["id"]) < after]
        return Page(rows=rows[:limit], has_more=len(rows) > limit)

    async def list_full(
        self,
        filters: TaskFilter,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
        max_bytes: int,
    ) -> Page:
        self.full_list_calls.append(max_bytes)
        return await self.list(filters, limit, after)

    async def cancel(self, task_id: uuid.UUID) -> CancelOutcome:
        row = self.rows.get(task_id)
        if row is None:
            return CancelOutcome(None, False)
        status = TaskStatus(row["status"])
        if status in CANCEL_NOW:
            row.update(status=TaskStatus.CANCELLED.value, finished_at=T0)
            return CancelOutcome(row, True)
        if status in CANCEL_LATER:
            row.update(cancel_requested=True)
            return CancelOutcome(row, True)
        return CancelOutcome(row, False)


# -- fixtures ---------------------------------------------------------------------------


@dataclass
class Harness:
    service: TaskService
    store: FakeTaskStore
    registry: TaskRegistry
    events: list[str]

    @property
    def wakes(self) -> int:
        return self.events.count("wake")


def make_harness(
    registry: TaskRegistry, *, default_max_attempts: int = 3, max_max_attempts: int = 10
) -> Harness:
    events: list[str] = []
    store = FakeTaskStore(events)
    service = TaskService(
        store,
        registry,
        default_max_attempts=default_max_attempts,
        max_max_attempts=max_max_attempts,
        wake_relay=lambda: events.append("wake"),
    )
    return Harness(service, store, registry, events)


@pytest.fixture
def registry() -> TaskRegistry:
    registry = TaskRegistry()
    registry.register("resize", ResizePayload, resize)
    registry.register("noop", NoPayload, noop)
    registry.register("aliased", AliasedPayload, aliased)
    return registry


@pytest.fixture
def h(registry: TaskRegistry) -> Harness:
    return make_harness(registry)


@pytest.fixture
def utc_rows(h: Harness) -> list[dict[str, Any]]:
    """Five tasks one second apart, oldest first."""
    return [h.store.add(TaskStatus.NEW, T0 + timedelta(seconds=i)) for i in range(5)]


# -- create -----------------------------------------------------------------------------


async def test_create_stores_the_normalised_task_and_returns_the_store_row(h: Harness) -> None:
    row = await h.service.create(
        TaskCreate(type="resize", payload={"url": "http://x/y.png", "width": "640"}, priority=5)
    )
    assert h.store.created == [
        NewTask(
            type="resize",
            payload={"url": "http://x/y.png", "width": 640, "height": 100, "fmt": "png"},
            priority=5,
            max_attempts=3,
        )
    ]
    assert row is h.store.rows[row["id"]]
    assert row["status"] == "NEW"


async def test_create_wakes_the_relay_once_after_the_store_write(h: Harness) -> None:
    await h.service.create(TaskCreate(type="noop"))
    assert h.events == ["store.create", "wake"]
    await h.service.create(TaskCreate(type="noop"))
    assert h.events == ["store.create", "wake", "store.create", "wake"]


async def test_create_does_not_wake_the_relay_when_the_store_write_fails(h: Harness) -> None:
    h.store.fail_create = ConnectionResetError("db gone")
    with pytest.raises(ConnectionResetError, match="db gone"):
        await h.service.create(TaskCreate(type="noop"))
    assert h.events == ["store.create"]


async def test_create_rejects_an_unknown_type_without_touching_store_or_relay(
    h: Harness,
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await h.service.create(TaskCreate(type="resise", payload={"url": "u", "width": 1}))
    assert caught.value.errors == [
        {
            "loc": ["body", "type"],
            "msg": "unknown task type 'resise'; registered: aliased, noop, resize",
            "type": "unknown_task_type",
        }
    ]
    assert str(caught.value) == (
        "body.type: unknown task type 'resise'; registered: aliased, noop, resize"
    )
    assert h.events == []
    assert h.store.created == []


async def test_create_reports_every_payload_error_under_body_payload(h: Harness) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await h.service.create(
            TaskCreate(type="resize", payload={"width": 0, "fmt": "gif", "colour": "red"})
        )
    errors = caught.value.errors
    assert [(e["loc"], e["type"]) for e in errors] == [
        (["body", "payload", "url"], "missing"),
        (["body", "payload", "width"], "greater_than"),
        (["body", "payload", "fmt"], "literal_error"),
        (["body", "payload", "colour"], "extra_forbidden"),
    ]
    assert errors[1]["msg"] == "Input should be greater than 0"
    # Only loc, msg and type: no echo of the input and no docs URL.
    assert all(set(e) == {"loc", "msg", "type"} for e in errors)
    assert str(caught.value) == "body.payload.url: Field required (and 3 more)"
    assert h.events == []


@pytest.mark.parametrize(
    "raw",
    [b'{"tasks": [{"type": "\xff"}]}', b"[" * 100_000, b'{"tasks": [' + b"9" * 5000 + b"]}"],
    ids=["not UTF-8", "nested too deeply", "an integer too long to read"],
)
async def test_a_batch_body_json_cannot_read_is_unreadable_not_invalid(
    h: Harness, raw: bytes
) -> None:
    # api.errors answers UnreadableBody 400, as FastAPI answers the single create's.
    with pytest.raises(UnreadableBody):
        await h.service.create_batch(raw)
    assert h.events == []


async def test_a_batch_body_that_is_not_json_is_invalid(h: Harness) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await h.service.create_batch(b'{"tasks": [')
    assert [error["type"] for error in caught.value.errors] == ["json_invalid"]
    assert h.events == []


async def test_create_applies_the_default_max_attempts(h: Harness) -> None:
    await h.service.create(TaskCreate(type="noop"))
    assert h.store.created[0].max_attempts == 3


async def test_create_applies_the_types_own_max_attempts_when_the_request_omits_it(
    h: Harness,
) -> None:
    h.registry.register("stubborn", NoPayload, noop, max_attempts=7)
    await h.service.create(TaskCreate(type="stubborn"))
    await h.service.create(TaskCreate(type="stubborn", max_attempts=2))
    assert [t.max_attempts for t in h.store.created] == [7, 2]


async def test_create_keeps_an_explicit_max_attempts_up_to_the_cap(h: Harness) -> None:
    await h.service.create(TaskCreate(type="noop", max_attempts=1))
    await h.service.create(TaskCreate(type="noop", max_attempts=10))
    assert [t.max_attempts for t in h.store.created] == [1, 10]


async def test_create_rejects_max_attempts_above_the_cap(h: Harness) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await h.service.create(TaskCreate(type="noop", max_attempts=11))
    assert caught.value.errors == [
        {
            "loc": ["body", "max_attempts"],
            "msg": "at most 10 attempts are allowed",
            "type": "less_than_equal",
        }
    ]
    assert h.events == []


def test_a_default_above_the_cap_is_rejected_too(registry: TaskRegistry) -> None:
    service = make_harness(registry, default_max_attempts=30, max_max_attempts=25).service
    with pytest.raises(InvalidRequest, match=r"^body\.max_attempts: at most 25 attempts"):
        service.validate(TaskCreate(type="noop"))


async def test_stored_payload_validates_again_against_its_model(h: Harness) -> None:
    await h.service.create(TaskCreate(type="aliased", payload={"from": "alice"}))
    stored = h.store.created[0].payload
    task_type = h.registry.get("aliased")
    assert task_type is not None
    # The consumer does exactly this before running the handler (consumer/attempt.py).
    try:
        reparsed = task_type.parse_payload(stored)
    except ValidationError as exc:
        pytest.fail(f"stored payload {stored!r} does not validate: {exc.errors()[0]['msg']}")
    assert isinstance(reparsed, AliasedPayload)
    assert reparsed.sender == "alice"


async def test_create_with_the_builtin_types() -> None:
    builtins = load_registry([])
    h = make_harness(builtins)
    await h.service.create(TaskCreate(type="echo", payload={"x": [1, {"y": None}]}))
    await h.service.create(TaskCreate(type="sleep", payload={"seconds": 2}))
    await h.service.create(TaskCreate(type="fail", payload={}))
    await h.service.create(TaskCreate(type="sha256", payload={"text": "hello"}))
    assert [(t.type, t.payload) for t in h.store.created] == [
        ("echo", {"x": [1, {"y": None}]}),
        ("sleep", {"seconds": 2.0}),
        ("fail", {"message": "drill", "retryable": True, "succeed_on_attempt": None}),
        ("sha256", {"text": "hello"}),
    ]
    assert h.wakes == 4

    with pytest.raises(InvalidRequest) as caught:
        await h.service.create(TaskCreate(type="sleep", payload={"seconds": -1, "x": 1}))
    assert [(e["loc"], e["type"]) for e in caught.value.errors] == [
        (["body", "payload", "seconds"], "greater_than_equal"),
        (["body", "payload", "x"], "extra_forbidden"),
    ]

    with pytest.raises(InvalidRequest) as caught:
        await h.service.create(TaskCreate(type="nope"))
    assert caught.value.errors[0]["loc"] == ["body", "type"]
    for name in ("echo", "fail", "sha256", "sleep"):
        assert name in caught.value.errors[0]["msg"]
    assert h.wakes == 4


# -- get and status -------------------------------------------------------------------


async def test_get_returns_the_row(h: Harness) -> None:
    row = h.store.add(TaskStatus.DONE)
    assert await h.service.get(row["id"]) is row


async def test_status_returns_the_status_view(h: Harness) -> None:
    row = h.store.add(TaskStatus.PROCESSING)
    assert await h.service.status(row["id"]) == {
        "id": row["id"],
        "status": "PROCESSING",
        "updated_at": T0,
    }


async def test_get_and_status_raise_task_not_found(h: Harness) -> None:
    missing = uuid.uuid4()
    with pytest.raises(TaskNotFound) as caught:
        await h.service.get(missing)
    assert str(caught.value) == f"task {missing} does not exist"
    with pytest.raises(TaskNotFound, match=f"^task {missing} does not exist$"):
        await h.service.status(missing)


# -- list -------------------------------------------------------------------------------


async def test_list_passes_filters_and_limit_through(h: Harness) -> None:
    after = datetime(2026, 1, 1, tzinfo=UTC)
    before = datetime(2026, 2, 1, tzinfo=timezone(timedelta(hours=2)))
    await h.service.list(
        statuses=[TaskStatus.DONE, TaskStatus.FAILED],
        type="resize",
        created_after=after,
        created_before=before,
        limit=7,
    )
    assert h.store.list_calls == [
        (
            TaskFilter(
                statuses=[TaskStatus.DONE, TaskStatus.FAILED],
                type="resize",
                created_after=after,
                created_before=before,
            ),
            7,
            None,
        )
    ]
    # An aware timestamp keeps its offset.
    passed = h.store.list_calls[0][0].created_before
    assert passed is not None
    assert passed.utcoffset() == timedelta(hours=2)


async def test_list_without_filters_passes_empty_ones(h: Harness) -> None:
    await h.service.list()
    assert h.store.list_calls == [(TaskFilter(statuses=(), type=None), 50, None)]


async def test_list_reads_naive_timestamps_as_utc(h: Harness) -> None:
    await h.service.list(
        created_after=datetime(2026, 1, 1, 12, 30),
        created_before=datetime(2026, 1, 2, 8, 0, 0, 5),
    )
    filters = h.store.list_calls[0][0]
    assert filters.created_after == datetime(2026, 1, 1, 12, 30, tzinfo=UTC)
    assert filters.created_before == datetime(2026, 1, 2, 8, 0, 0, 5, tzinfo=UTC)
    assert filters.created_after is not None
    assert filters.created_after.tzinfo is UTC


async def test_list_decodes_the_cursor_into_the_keyset_position(h: Harness) -> None:
    task_id = uuid.uuid4()
    cursor = pagination.encode(T0, task_id)
    await h.service.list(cursor=cursor, limit=2)
    assert h.store.list_calls[0][1:] == (2, (T0, task_id))


async def test_list_gives_next_cursor_only_when_there_is_more(
    h: Harness, utc_rows: list[dict[str, Any]]
) -> None:
    first = await h.service.list(limit=3)
    assert [r["id"] for r in first.rows] == [r["id"] for r in reversed(utc_rows[2:])]
    last = utc_rows[2]
    assert first.next_cursor == pagination.encode(last["created_at"], last["id"])

    second = await h.service.list(limit=3, cursor=first.next_cursor)
    assert [r["id"] for r in second.rows] == [utc_rows[1]["id"], utc_rows[0]["id"]]
    assert second.next_cursor is None
    assert h.store.list_calls[1][2] == (last["created_at"], last["id"])


async def test_list_asks_for_summaries_unless_the_full_view_is_asked_for(
    h: Harness, utc_rows: list[dict[str, Any]]
) -> None:
    summaries = await h.service.list(limit=3)
    assert (summaries.full, h.store.full_list_calls) == (False, [])

    full = await h.service.list(limit=3, view="full")
    assert full.full is True
    assert h.store.full_list_calls == [1_048_576]  # MAX_PAGE_BYTES' default
    assert full.next_cursor == summaries.next_cursor


async def test_the_full_view_passes_the_configured_budget(registry: TaskRegistry) -> None:
    store = FakeTaskStore([])
    service = TaskService(
        store,
        registry,
        default_max_attempts=3,
        max_max_attempts=10,
        wake_relay=lambda: None,
        max_page_bytes=4096,
    )
    await service.list(view="full")
    assert store.full_list_calls == [4096]


async def test_list_exactly_one_full_page_has_no_next_cursor(
    h: Harness, utc_rows: list[dict[str, Any]]
) -> None:
    listing = await h.service.list(limit=5)
    assert len(listing.rows) == 5
    assert listing.next_cursor is None


@pytest.mark.parametrize(
    "cursor",
    [
        "not-a-cursor",
        "",
        pagination.encode(T0, uuid.uuid4())[:-3],
        pagination.encode(T0.replace(tzinfo=None), uuid.uuid4()),
    ],
    ids=["garbage", "empty", "truncated", "naive-timestamp"],
)
async def test_list_rejects_an_invalid_cursor(h: Harness, cursor: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await h.service.list(cursor=cursor)
    assert caught.value.errors == [
        {
            "loc": ["query", "cursor"],
            "msg": "cursor is not one this API issued; use next_cursor as given",
            "type": "value_error",
        }
    ]
    assert h.store.list_calls == []


# -- cancel -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [TaskStatus.NEW, TaskStatus.PENDING])
async def test_cancel_before_start_is_immediate(h: Harness, status: TaskStatus) -> None:
    row = h.store.add(status)
    cancellation = await h.service.cancel(row["id"])
    assert cancellation == Cancellation(row, immediate=True)
    assert cancellation.task["status"] == "CANCELLED"


async def test_cancel_of_a_running_task_is_only_requested(h: Harness) -> None:
    row = h.store.add(TaskStatus.PROCESSING)
    cancellation = await h.service.cancel(row["id"])
    assert cancellation.immediate is False
    assert cancellation.task["status"] == "PROCESSING"
    assert cancellation.task["cancel_requested"] is True


@pytest.mark.parametrize("status", [TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED])
async def test_cancel_of_a_finished_task_raises_task_finished(
    h: Harness, status: TaskStatus
) -> None:
    row = h.store.add(status)
    with pytest.raises(TaskFinished) as caught:
        await h.service.cancel(row["id"])
    assert (
        str(caught.value) == f"task {row['id']} is already {status.value}; it cannot be cancelled"
    )
    assert row["status"] == status.value


async def test_cancel_of_an_unknown_task_raises_task_not_found(h: Harness) -> None:
    missing = uuid.uuid4()
    with pytest.raises(TaskNotFound, match=str(missing)):
        await h.service.cancel(missing)


# -- idempotency keys --------------------------------------------------------------------


async def test_a_new_idempotency_key_creates_and_wakes_once(h: Harness) -> None:
    row, created = await h.service.create_once(TaskCreate(type="noop"), "key-1")
    assert created is True
    assert h.events == ["store.create", "wake"]
    again, created_again = await h.service.create_once(TaskCreate(type="noop"), "key-1")
    assert (again["id"], created_again) == (row["id"], False)
    assert h.events == ["store.create", "wake"]  # nothing stored, no wake-up


async def test_a_reused_idempotency_key_with_another_request_is_a_conflict(h: Harness) -> None:
    row, _ = await h.service.create_once(TaskCreate(type="noop", priority=1), "key-2")
    with pytest.raises(IdempotencyConflict, match=str(row["id"])):
        await h.service.create_once(TaskCreate(type="noop", priority=2), "key-2")
    with pytest.raises(IdempotencyConflict):
        await h.service.create_once(
            TaskCreate(type="resize", payload={"url": "u", "width": 10}), "key-2"
        )


async def test_an_invalid_request_with_a_key_is_rejected_before_the_store(h: Harness) -> None:
    with pytest.raises(InvalidRequest):
        await h.service.create_once(TaskCreate(type="nope"), "key-3")
    assert h.events == []
    assert h.store.keys == {}
