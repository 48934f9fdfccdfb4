"""The task service: what the routes ask for, independent of HTTP and of Postgres.

It checks a request against the task registry and the settings, calls the store, and
raises domain errors that ``api.errors`` turns into problem responses. The store is a
protocol so that the rules here can be unit-tested without a database.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg
from opentelemetry.trace import Tracer
from pydantic import ValidationError

from taskbox.api import pagination
from taskbox.api.batch import read_batch
from taskbox.api.create_spans import TASK_COUNT, TASK_CREATED, TASK_ID, TASK_TYPE, CreateSpans
from taskbox.api.grouping import GroupCommit
from taskbox.api.metrics import ApiMetrics
from taskbox.api.schemas import ListView, TaskCreate
from taskbox.db import tasks as task_store
from taskbox.db.errors import nothing_committed
from taskbox.db.states import TERMINAL, TaskStatus
from taskbox.db.storable import MAX_STRING, UnstorablePayload, check_storable
from taskbox.runtime.durations import format_duration
from taskbox.runtime.queues import InvalidQueueName, check_queue_name
from taskbox.tasktypes import TaskRegistry, TaskType
from taskbox.webhooks import (
    AllowList,
    InvalidWebhookUrl,
    UnsafeDestination,
    check_url,
    resolve_destination,
)

TaskRow = Mapping[str, Any]


class TaskNotFound(LookupError):
    def __init__(self, task_id: uuid.UUID) -> None:
        super().__init__(f"task {task_id} does not exist")


class TaskFinished(Exception):
    """The task is terminal; it cannot be cancelled."""

    def __init__(self, task_id: uuid.UUID, status: TaskStatus) -> None:
        super().__init__(f"task {task_id} is already {status}; it cannot be cancelled")


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before, for a different request."""

    def __init__(self, task_id: uuid.UUID) -> None:
        super().__init__(
            f"this Idempotency-Key already created task {task_id} from a different request; "
            "use a new key for a new task"
        )


class InvalidRequest(ValueError):
    """A request that parsed but breaks a rule; ``errors`` say where, like a 422's."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}{more}")

    @classmethod
    def at(cls, loc: list[str | int], msg: str, kind: str = "value_error") -> InvalidRequest:
        """One problem at ``loc``."""
        return cls([{"loc": loc, "msg": msg, "type": kind}])


class TaskStore(Protocol):
    async def create(self, task: task_store.NewTask, headers: dict[str, Any]) -> TaskRow: ...
    async def create_once(
        self, task: task_store.NewTask, headers: dict[str, Any], idempotency_key: str
    ) -> tuple[TaskRow, bool]: ...
    async def create_many(
        self, tasks: list[task_store.NewTask], headers: dict[str, Any]
    ) -> list[TaskRow]: ...
    async def get(self, task_id: uuid.UUID) -> TaskRow | None: ...
    async def status(self, task_id: uuid.UUID) -> TaskRow | None: ...
    async def list(
        self,
        filters: task_store.TaskFilter,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
    ) -> task_store.Page: ...
    async def list_full(
        self,
        filters: task_store.TaskFilter,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
        max_bytes: int,
    ) -> task_store.Page: ...
    async def cancel(self, task_id: uuid.UUID) -> task_store.CancelOutcome: ...


class PostgresTaskStore:
    """The store the service uses in production: ``db.tasks`` over the pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.creates: GroupCommit[tuple[task_store.NewTask, dict[str, Any]], TaskRow] = GroupCommit(
            self._create_one, self._create_group, nothing_committed
        )

    async def create(self, task: task_store.NewTask, headers: dict[str, Any]) -> TaskRow:
        return await self.creates.write((task, headers))

    async def _create_one(self, item: tuple[task_store.NewTask, dict[str, Any]]) -> TaskRow:
        row: TaskRow = await task_store.create_task(self._pool, *item)
        return row

    async def _create_group(
        self, items: list[tuple[task_store.NewTask, dict[str, Any]]]
    ) -> list[TaskRow]:
        rows: list[TaskRow] = await task_store.create_group(self._pool, items)
        return rows

    async def close(self) -> None:
        await self.creates.close()

    async def create_once(
        self, task: task_store.NewTask, headers: dict[str, Any], idempotency_key: str
    ) -> tuple[TaskRow, bool]:
        row, created = await task_store.create_task_once(self._pool, task, headers, idempotency_key)
        return row, created

    async def create_many(
        self, tasks: list[task_store.NewTask], headers: dict[str, Any]
    ) -> list[TaskRow]:
        rows: list[TaskRow] = await task_store.create_tasks(self._pool, tasks, headers)
        return rows

    async def get(self, task_id: uuid.UUID) -> TaskRow | None:
        return await task_store.get_task(self._pool, task_id)

    async def status(self, task_id: uuid.UUID) -> TaskRow | None:
        return await task_store.get_status(self._pool, task_id)

    async def list(
        self,
        filters: task_store.TaskFilter,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
    ) -> task_store.Page:
        return await task_store.list_tasks(self._pool, filters, limit, after)

    async def list_full(
        self,
        filters: task_store.TaskFilter,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
        max_bytes: int,
    ) -> task_store.Page:
        return await task_store.list_full_tasks(self._pool, filters, limit, after, max_bytes)

    async def cancel(self, task_id: uuid.UUID) -> task_store.CancelOutcome:
        return await task_store.cancel_task(self._pool, task_id)


@dataclass(frozen=True, slots=True)
class Listing:
    rows: list[TaskRow]
    next_cursor: str | None
    full: bool = False  # whole tasks (view=full), not summaries


@dataclass(frozen=True, slots=True)
class Cancellation:
    task: TaskRow
    immediate: bool  # False: the task runs and was only flagged cancel_requested


def _position(problem: dict[str, Any]) -> int:
    """Where a batch problem points: its task's position, -1 for the batch itself."""
    loc = problem["loc"]
    return loc[2] if len(loc) > 2 and isinstance(loc[2], int) else -1


def _aware(moment: datetime | None) -> datetime | None:
    # A timestamp without an offset is read as UTC rather than rejected.
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


class TaskService:
    def __init__(
        self,
        store: TaskStore,
        registry: TaskRegistry,
        *,
        default_max_attempts: int,
        max_max_attempts: int,
        wake_relay: Callable[[], None],
        metrics: ApiMetrics | None = None,
        max_payload_string: int = MAX_STRING,
        max_schedule_delay: float = 365 * 86400.0,
        max_page_bytes: int = 1_048_576,
        tracer: Tracer | None = None,
        callback_destinations: AllowList | None = None,
        callback_secret_set: bool = False,
    ) -> None:
        self._spans = CreateSpans(tracer)
        self._callback_destinations = callback_destinations or AllowList()
        self._callback_secret_set = callback_secret_set
        self._max_page_bytes = max_page_bytes
        self._max_payload_string = max_payload_string
        self._max_schedule_delay = max_schedule_delay
        self._store = store
        self._registry = registry
        self._default_max_attempts = default_max_attempts
        self._max_max_attempts = max_max_attempts
        self._wake_relay = wake_relay
        self._metrics = metrics if metrics is not None else ApiMetrics()

    def validate(self, request: TaskCreate) -> task_store.NewTask:
        task_type = self._registry.get(request.type)
        if task_type is None:
            known = ", ".join(self._registry.names()) or "none"
            raise InvalidRequest.at(
                ["body", "type"],
                f"unknown task type {request.type!r}; registered: {known}",
                "unknown_task_type",
            )
        try:
            check_storable(request.payload, max_string=self._max_payload_string)
        except UnstorablePayload as exc:
            raise InvalidRequest.at(
                ["body", "payload", *exc.loc], exc.msg, "unstorable_value"
            ) from None
        try:
            # by_alias: the stored payload must validate again, in the consumer, against
            # the same model, so fields keep the names the model accepts as input.
            payload = task_type.parse_payload(request.payload).model_dump(
                mode="json", by_alias=True
            )
        except ValidationError as exc:
            raise InvalidRequest(
                [
                    {"loc": ["body", "payload", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors(include_url=False, include_input=False)
                ]
            ) from None
        # The request's own, else the type's (registered with it), else DEFAULT_MAX_ATTEMPTS.
        max_attempts = request.max_attempts or task_type.max_attempts or self._default_max_attempts
        if max_attempts > self._max_max_attempts:
            raise InvalidRequest.at(
                ["body", "max_attempts"],
                f"at most {self._max_max_attempts} attempts are allowed",
                "less_than_equal",
            )
        run_at, delay = self._schedule(request)
        return task_store.NewTask(
            request.type,
            payload,
            request.priority,
            max_attempts,
            run_at=run_at,
            delay=delay,
            queue=self._queue(request, task_type),
            callback_url=self._callback_url(request),
        )

    def _callback_url(self, request: TaskCreate) -> str | None:
        """The callback_url's form (its destination is checked by ``check_callbacks``)."""
        if request.callback_url is None:
            return None
        if not self._callback_secret_set:
            raise InvalidRequest.at(
                ["body", "callback_url"],
                "callback_url needs the server's WEBHOOK_CALLBACK_SECRET to sign its "
                "deliveries, and it is not set: set it (whsec_<base64>) or subscribe a "
                "webhook instead",
                "callback_secret_unset",
            )
        try:
            check_url(request.callback_url)
        except InvalidWebhookUrl as exc:
            raise InvalidRequest.at(["body", "callback_url"], str(exc), "invalid_url") from None
        return request.callback_url

    async def check_callbacks(self, tasks: list[task_store.NewTask], loc: list[str | int]) -> None:
        """Every callback_url's host resolves to addresses webhooks may reach; else
        InvalidRequest at ``loc`` (+ the position, for a batch) saying why."""
        problems = []
        for position, task in enumerate(tasks):
            if task.callback_url is None:
                continue
            try:
                await resolve_destination(check_url(task.callback_url), self._callback_destinations)
            except UnsafeDestination as exc:
                # a batch's tasks are found by their position under ["body", "tasks"]
                prefix = [*loc, position] if loc[-1] == "tasks" else loc
                problems.append(
                    {
                        "loc": [*prefix, "callback_url"],
                        "msg": str(exc),
                        "type": "unsafe_destination",
                    }
                )
        if problems:
            raise InvalidRequest(problems)

    @staticmethod
    def _queue(request: TaskCreate, task_type: TaskType) -> str:
        """The queue asked for, if the type is registered for it; else the type's own."""
        if request.queue is None:
            return task_type.queue
        if request.queue not in task_type.queues:
            try:
                check_queue_name(request.queue)
            except InvalidQueueName as exc:
                raise InvalidRequest.at(["body", "queue"], str(exc), "invalid_queue") from None
            allowed = ", ".join(task_type.queues)
            raise InvalidRequest.at(
                ["body", "queue"],
                f"task type {request.type!r} does not run in queue {request.queue!r}; "
                f"allowed queues: {allowed}",
                "queue_not_allowed",
            )
        return request.queue

    def _schedule_limit(self) -> str:
        return f"at most {format_duration(self._max_schedule_delay)} ahead (MAX_SCHEDULE_DELAY)"

    def _schedule(self, request: TaskCreate) -> tuple[datetime | None, float | None]:
        """``run_at`` or ``delay_seconds``, checked; the delay is left for the database
        to add to its own clock, the one the relay's claim compares with."""
        if request.run_at is not None:
            if request.delay_seconds is not None:
                raise InvalidRequest.at(
                    ["body", "delay_seconds"], "give run_at or delay_seconds, not both"
                )
            if request.run_at.tzinfo is None:
                # A moment without an offset means a different time on every server.
                raise InvalidRequest.at(
                    ["body", "run_at"],
                    "run_at needs a UTC offset, e.g. 2026-12-24T18:00:00Z",
                    "timezone_aware",
                )
            # In range: api.params refused a moment that is outside years 1-9999 in UTC.
            ahead = request.run_at.astimezone(UTC) - datetime.now(UTC)
            if ahead > timedelta(seconds=self._max_schedule_delay):
                raise InvalidRequest.at(
                    ["body", "run_at"], f"run_at is {self._schedule_limit()}", "too_far"
                )
            return request.run_at, None
        if request.delay_seconds is not None:
            if request.delay_seconds > self._max_schedule_delay:
                raise InvalidRequest.at(
                    ["body", "delay_seconds"],
                    f"delay_seconds is {self._schedule_limit()}",
                    "too_far",
                )
            return None, request.delay_seconds
        return None, None

    async def create(self, request: TaskCreate, traceparent: str | None = None) -> TaskRow:
        """Store the task and its outbox row; the row's headers carry the trace context
        (the caller's ``traceparent`` continued, or a new trace) to the consumer."""
        task = self.validate(request)
        await self.check_callbacks([task], ["body"])
        with self._spans.create(traceparent, {TASK_TYPE: task.type}) as (span, headers):
            row = await self._store.create(task, headers)
            if span is not None:
                span.set_attribute(TASK_ID, str(row["id"]))
        self._wake_relay()
        self._metrics.tasks_created.labels(task.type).inc()
        return row

    async def create_batch(self, raw: bytes, traceparent: str | None = None) -> list[TaskRow]:
        """Store every task of a batch body in one transaction and wake the relay once,
        or, if any task breaks a rule, store none and report every problem by position."""
        requests, problems = read_batch(raw)
        tasks: list[task_store.NewTask] = []
        for position, request in requests:
            try:
                tasks.append(self.validate(request))
            except InvalidRequest as exc:
                # ["body", "payload", ...] of a single create is
                # ["body", "tasks", position, "payload", ...] here.
                problems += [
                    {**error, "loc": ["body", "tasks", position, *error["loc"][1:]]}
                    for error in exc.errors
                ]
        if problems:
            problems.sort(key=_position)
            raise InvalidRequest(problems)
        await self.check_callbacks(tasks, ["body", "tasks"])
        # The request is one hop of the trace: every task of it carries that hop's
        # context, so all of them are found under one trace id in the logs.
        with self._spans.create(traceparent, {TASK_COUNT: len(tasks)}) as (_, headers):
            rows = await self._store.create_many(tasks, headers)
        self._wake_relay()
        # One counter step per type, not per task: a label lookup costs ~1 µs.
        for task_type, created in Counter(task.type for task in tasks).items():
            self._metrics.tasks_created.labels(task_type).inc(created)
        return rows

    async def create_once(
        self, request: TaskCreate, idempotency_key: str, traceparent: str | None = None
    ) -> tuple[TaskRow, bool]:
        """Like ``create``, once per key: the same key with the same request returns the
        task it created (and False); with a different request it is a conflict."""
        task = self.validate(request)
        await self.check_callbacks([task], ["body"])
        with self._spans.create(traceparent, {TASK_TYPE: task.type}) as (span, headers):
            row, created = await self._store.create_once(task, headers, idempotency_key)
            if span is not None:
                span.set_attributes({TASK_ID: str(row["id"]), TASK_CREATED: created})
        if created:
            self._wake_relay()
            self._metrics.tasks_created.labels(task.type).inc()
            return row, True
        stored_digest = row.get("request_digest")
        if stored_digest is not None:
            same = bytes(stored_digest) == task_store.request_digest(task)
        else:  # keyed before digests were stored: the row is all there is to compare
            same = (
                row["type"],
                row["payload"],
                row["priority"],
                row["max_attempts"],
                row["queue"],
            ) == (task.type, task.payload, task.priority, task.max_attempts, task.queue)
        # A delay counts from each request's arrival, so a retry asks for a later moment
        # by nature; only an explicit run_at is part of what must match.
        if task.run_at is not None and row["run_at"] != task.run_at:
            same = False
        if not same:
            raise IdempotencyConflict(row["id"])
        return row, False

    async def get(self, task_id: uuid.UUID) -> TaskRow:
        row = await self._store.get(task_id)
        if row is None:
            raise TaskNotFound(task_id)
        return row

    async def status(self, task_id: uuid.UUID) -> TaskRow:
        row = await self._store.status(task_id)
        if row is None:
            raise TaskNotFound(task_id)
        return row

    async def list(
        self,
        *,
        statuses: list[TaskStatus] | None = None,
        type: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        cursor: str | None = None,
        view: ListView = "summary",
    ) -> Listing:
        """A page of summaries; with ``view="full"``, of whole tasks, ended early (with
        a cursor) where their payloads, results and errors would pass MAX_PAGE_BYTES."""
        after = None
        if cursor is not None:
            try:
                after = pagination.decode(cursor)
            except pagination.InvalidCursor as exc:
                raise InvalidRequest.at(["query", "cursor"], str(exc)) from None
        filters = task_store.TaskFilter(
            statuses=statuses or (),
            type=type,
            created_after=_aware(created_after),
            created_before=_aware(created_before),
        )
        full = view == "full"
        if full:
            page = await self._store.list_full(filters, limit, after, self._max_page_bytes)
        else:
            page = await self._store.list(filters, limit, after)
        next_cursor = None
        if page.has_more:
            last = page.rows[-1]
            next_cursor = pagination.encode(last["created_at"], last["id"])
        return Listing(list(page.rows), next_cursor, full)

    async def cancel(self, task_id: uuid.UUID) -> Cancellation:
        outcome = await self._store.cancel(task_id)
        if outcome.task is None:
            raise TaskNotFound(task_id)
        status = TaskStatus(outcome.task["status"])
        if not outcome.changed:
            assert status in TERMINAL
            raise TaskFinished(task_id, status)
        return Cancellation(outcome.task, immediate=status is not TaskStatus.PROCESSING)
