"""What the sync and async clients share: the requests each operation sends, when a
failed attempt is retried and after how long, and how an answer becomes a model or an
exception. The two clients only add the I/O (``httpx.Client`` or ``httpx.AsyncClient``,
``time.sleep`` or ``asyncio.sleep``) around it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from taskbox.client.errors import TransportError, api_error
from taskbox.client.models import (
    NewTask,
    Problem,
    TaskPage,
    TaskStatus,
    TaskSummary,
    TaskSummaryPage,
)

M = TypeVar("M", bound=BaseModel)

TASKS = "/api/v1/tasks"
ListView = Literal["summary", "full"]


@dataclass(frozen=True)
class RetryPolicy:
    """When the client tries a request again.

    It retries a 503 (the api's database is unreachable, or its connection limit is
    reached), waiting what ``Retry-After`` says (at most ``max_retry_after``) or else
    backing off exponentially, and a connection error: always when the connection was
    never made, and when the request may have reached the server only if repeating it
    is safe (GET, DELETE, and a create, which always carries an Idempotency-Key). Never
    more than ``max_attempts`` attempts, and no retry that would start later than
    ``max_elapsed`` seconds after the first attempt.
    """

    max_attempts: int = 5
    max_elapsed: float = 30.0
    max_retry_after: float = 10.0
    backoff: float = 0.1
    max_backoff: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")


NO_RETRIES = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Call:
    """One API request, before it is sent (possibly several times)."""

    method: str
    path: str
    params: httpx.QueryParams | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # Whether sending it twice does no more than sending it once, so a connection that
    # failed after the request may have reached the server can be retried.
    repeatable: bool = True


# Errors raised before any byte of the request left: nothing reached the server.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Attempts:
    """One call's retry bookkeeping: its policy, the attempts made, the clock."""

    def __init__(
        self, policy: RetryPolicy, call: Call, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._policy = policy
        self._call = call
        self._clock = clock
        self._started = clock()
        self._made = 0

    def _delay(self, wanted: float | None) -> float | None:
        """The pause before the next attempt, or None when the policy allows none."""
        self._made += 1
        if self._made >= self._policy.max_attempts:
            return None
        if wanted is None:
            wanted = min(self._policy.backoff * 2 ** (self._made - 1), self._policy.max_backoff)
        delay = min(max(wanted, 0.0), self._policy.max_retry_after)
        if self._clock() + delay - self._started > self._policy.max_elapsed:
            return None
        return delay

    def after_response(self, response: httpx.Response) -> float | None:
        """The pause before trying again, or None: the response is the answer."""
        if response.status_code != 503 or not self._call.repeatable:
            return None
        return self._delay(retry_after(response))

    def after_error(self, exc: httpx.TransportError) -> float:
        """The pause before trying again; raises TransportError when it must not be."""
        if isinstance(exc, _NOT_SENT) or self._call.repeatable:
            delay = self._delay(None)
            if delay is not None:
                return delay
            why = f"after {self._made} attempts"
        else:
            why = "and the request is not safe to repeat"
        raise TransportError(
            f"{self._call.method} {self._call.path} failed ({type(exc).__name__}: {exc}) {why}"
        ) from exc


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (the api sends seconds, never an HTTP date)."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def parse(response: httpx.Response, model: type[M]) -> M:
    """The response's body as ``model``, or the ApiError its problem document makes."""
    if response.is_success:
        return model.model_validate_json(response.content)
    raise api_error(response.status_code, problem_of(response))


def problem_of(response: httpx.Response) -> Problem:
    try:
        return Problem.model_validate_json(response.content)
    except ValidationError:
        # Not from the app: uvicorn's plain-text 503, a proxy's error page.
        return Problem(
            title=response.reason_phrase or str(response.status_code),
            status=response.status_code,
            detail=response.text[:2000],
            request_id=response.headers.get("x-request-id"),
        )


def default_headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = {"Accept": "application/json", **(headers or {})}
    if api_key is not None:
        out["Authorization"] = f"Bearer {api_key}"
    return out


# -- the operations ---------------------------------------------------------------------


def create_call(task: NewTask, idempotency_key: str | None) -> Call:
    # Every create carries a key, so a create whose answer was lost is repeated safely:
    # the api answers the repeat with the task the first attempt made.
    key = idempotency_key if idempotency_key is not None else f"taskbox-client-{uuid.uuid4()}"
    return Call("POST", TASKS, json=task.body(), headers={"Idempotency-Key": key})


def create_many_call(tasks: Iterable[NewTask | Mapping[str, Any]]) -> Call:
    body = [as_new_task(task).body() for task in tasks]
    # The batch takes no Idempotency-Key: a batch that may have reached the server is
    # not sent again, and neither is one answered 503 (a connection to Postgres lost
    # while the commit was in flight is a 503 too, the batch possibly stored).
    return Call("POST", f"{TASKS}/batch", json={"tasks": body}, repeatable=False)


def as_new_task(task: NewTask | Mapping[str, Any]) -> NewTask:
    return task if isinstance(task, NewTask) else NewTask.model_validate(task)


def get_call(task_id: uuid.UUID | str) -> Call:
    return Call("GET", f"{TASKS}/{task_id}")


def wait_call(task_id: uuid.UUID | str, seconds: float) -> Call:
    """A long poll: the task once it is finished, or as it is after ``seconds``."""
    return Call("GET", f"{TASKS}/{task_id}", params=httpx.QueryParams({"wait": f"{seconds:.3f}"}))


def status_call(task_id: uuid.UUID | str) -> Call:
    return Call("GET", f"{TASKS}/{task_id}/status")


def cancel_call(task_id: uuid.UUID | str) -> Call:
    # Cancelling twice is harmless: the repeat of a cancel that went through is a 409
    # (already CANCELLED) or another 202.
    return Call("DELETE", f"{TASKS}/{task_id}")


@dataclass(frozen=True)
class ListQuery:
    """The list's filters, as ``GET /api/v1/tasks`` takes them."""

    status: TaskStatus | str | Iterable[TaskStatus | str] | None = None
    type: str | None = None
    created_after: datetime | str | None = None
    created_before: datetime | str | None = None
    page_size: int = 50
    view: ListView = "summary"

    def call(self, cursor: str | None) -> Call:
        params: list[tuple[str, str]] = []
        statuses = [self.status] if isinstance(self.status, str) else self.status or []
        params += [("status", str(status)) for status in statuses]
        if self.type is not None:
            params.append(("type", self.type))
        for name, moment in (
            ("created_after", self.created_after),
            ("created_before", self.created_before),
        ):
            if moment is not None:
                params.append(
                    (name, moment.isoformat() if isinstance(moment, datetime) else moment)
                )
        params += [("limit", str(self.page_size)), ("view", self.view)]
        if cursor is not None:
            params.append(("cursor", cursor))
        return Call("GET", TASKS, params=httpx.QueryParams(tuple(params)))

    def page(self, response: httpx.Response) -> tuple[Sequence[TaskSummary], str | None]:
        """A page's tasks (whole ones with ``view="full"``) and its next cursor."""
        page: TaskPage | TaskSummaryPage
        if self.view == "full":
            page = parse(response, TaskPage)
        else:
            page = parse(response, TaskSummaryPage)
        return page.items, page.next_cursor


class WaitSchedule:
    """How often ``wait()`` asks for a task's status: soon at first (most tasks are
    quick), then less often, never past the deadline."""

    def __init__(
        self,
        timeout: float,
        first: float = 0.05,
        factor: float = 1.5,
        longest: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._deadline = clock() + timeout
        self._next = first
        self._factor = factor
        self._longest = longest

    def pause(self) -> float | None:
        """The pause before the next poll, or None when the deadline has passed."""
        left = self._deadline - self._clock()
        if left <= 0:
            return None
        pause = min(self._next, left)
        self._next = min(self._next * self._factor, self._longest)
        return pause


# One long poll's wait at most: under the api's default cap (TASK_WAIT_MAX, 60 s) and
# under the idle timeout many proxies apply to a silent response (often 30 s or 60 s).
LONG_POLL = 25.0


class WaitPlan:
    """The requests of ``wait()``: each a long poll (``?wait=``) for what is left of the
    timeout, at most LONG_POLL and a second less than the client's read timeout, so the
    api answers before the client would give up on the response.

    An api that answers an unfinished task long before the wait it was asked for does not
    hold requests (an older one ignores ``?wait=``): ``wait()`` then pauses between its
    requests as it did when it polled, rather than asking again at once.
    """

    def __init__(
        self,
        timeout: float,
        read_timeout: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._deadline = clock() + timeout
        self._longest = LONG_POLL if read_timeout is None else min(LONG_POLL, read_timeout - 1)
        self._longest = max(self._longest, 0.0)
        self._polling = WaitSchedule(timeout, clock=clock)

    def left(self) -> float:
        return self._deadline - self._clock()

    def next_wait(self) -> float:
        """The ``wait`` of the next request (0: answer at once)."""
        return max(0.0, min(self.left(), self._longest))

    def pause(self, asked: float, took: float) -> float | None:
        """The pause before the next request, after one that asked to wait ``asked``
        seconds came back unfinished after ``took``; None when the timeout is over."""
        if self.left() <= 0:
            return None
        if took < asked / 2:
            return self._polling.pause()
        return 0.0
