"""``Client``: the task API from blocking code, on ``httpx.Client``.

The twin of ``taskbox.client._async``: the same methods, without ``await``; what the two
share (requests, retries, parsing) is in ``taskbox.client._core``.
"""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self, overload

import httpx

from taskbox.client import _core
from taskbox.client._core import Call, ListQuery, RetryPolicy
from taskbox.client.errors import WaitTimeout
from taskbox.client.models import (
    NewTask,
    Task,
    TaskBatch,
    TaskStatus,
    TaskStatusView,
    TaskSummary,
)


class Client:
    """A client of one Taskbox api.

    ``Client("http://127.0.0.1:8000", api_key=...)``; use it as a context manager, or
    call ``client.close()``. ``transport`` replaces httpx's network transport.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=base_url,
            headers=_core.default_headers(api_key, headers),
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> httpx.Response:
        attempts = _core.Attempts(self._retry, call)
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, params=call.params, json=call.json, headers=call.headers
                )
            except httpx.TransportError as exc:
                time.sleep(attempts.after_error(exc))
                continue
            delay = attempts.after_response(response)
            if delay is None:
                return response
            time.sleep(delay)

    def create(
        self,
        type: str,
        payload: dict[str, Any] | None = None,
        *,
        priority: int = 0,
        max_attempts: int | None = None,
        run_at: datetime | None = None,
        delay_seconds: float | None = None,
        queue: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """Create a task. Without ``idempotency_key`` the client makes one for this
        call, so its own retries never create a second task; pass your own to make
        retries of your own (another process, a restart) safe too."""
        task = NewTask(
            type=type,
            payload=payload or {},
            priority=priority,
            max_attempts=max_attempts,
            run_at=run_at,
            delay_seconds=delay_seconds,
            queue=queue,
            callback_url=callback_url,
        )
        response = self._send(_core.create_call(task, idempotency_key))
        return _core.parse(response, Task)

    def create_many(self, tasks: Iterable[NewTask | Mapping[str, Any]]) -> builtins.list[Task]:
        """Create up to 1,000 tasks in one transaction: all of them or, on a 422, none."""
        response = self._send(_core.create_many_call(tasks))
        return _core.parse(response, TaskBatch).items

    def get(self, task_id: uuid.UUID | str) -> Task:
        return _core.parse(self._send(_core.get_call(task_id)), Task)

    def status(self, task_id: uuid.UUID | str) -> TaskStatusView:
        return _core.parse(self._send(_core.status_call(task_id)), TaskStatusView)

    def cancel(self, task_id: uuid.UUID | str) -> Task:
        """Cancel a task: CANCELLED at once if it had not started, else
        ``cancel_requested``; a finished task raises Conflict."""
        return _core.parse(self._send(_core.cancel_call(task_id)), Task)

    @overload
    def list(
        self,
        *,
        status: TaskStatus | str | Iterable[TaskStatus | str] | None = ...,
        type: str | None = ...,
        created_after: datetime | str | None = ...,
        created_before: datetime | str | None = ...,
        page_size: int = ...,
        view: Literal["summary"] = ...,
    ) -> Iterator[TaskSummary]: ...

    @overload
    def list(
        self,
        *,
        status: TaskStatus | str | Iterable[TaskStatus | str] | None = ...,
        type: str | None = ...,
        created_after: datetime | str | None = ...,
        created_before: datetime | str | None = ...,
        page_size: int = ...,
        view: Literal["full"],
    ) -> Iterator[Task]: ...

    def list(
        self,
        *,
        status: TaskStatus | str | Iterable[TaskStatus | str] | None = None,
        type: str | None = None,
        created_after: datetime | str | None = None,
        created_before: datetime | str | None = None,
        page_size: int = 50,
        view: Literal["summary", "full"] = "summary",
    ) -> Iterator[TaskSummary]:
        """Every matching task, newest first, page after page (``page_size`` a page)
        until the last: summaries, or whole tasks with ``view="full"``."""
        query = ListQuery(status, type, created_after, created_before, page_size, view)
        cursor: str | None = None
        while True:
            items, cursor = query.page(self._send(query.call(cursor)))
            yield from items
            if cursor is None:
                return

    def wait(self, task_id: uuid.UUID | str, timeout: float = 60.0) -> Task:
        """The task once it is DONE, FAILED or CANCELLED; WaitTimeout (with the last
        status seen) if it is not within ``timeout`` seconds.

        Long polls ``GET /api/v1/tasks/{id}?wait=``, so it learns of the outcome as
        soon as the api does (within one request, not a polling interval)."""
        plan = _core.WaitPlan(timeout, self._http.timeout.read)
        while True:
            asked = plan.next_wait()
            sent = time.monotonic()
            task = _core.parse(self._send(_core.wait_call(task_id, asked)), Task)
            if task.status.is_terminal:
                return task
            pause = plan.pause(asked, time.monotonic() - sent)
            if pause is None:
                seen = TaskStatusView(id=task.id, status=task.status, updated_at=task.updated_at)
                raise WaitTimeout(seen.id, timeout, seen)
            if pause > 0:
                time.sleep(pause)
