"""What the client raises. Everything derives from ``TaskboxError``."""

from __future__ import annotations

import uuid

from taskbox.client.models import Problem, TaskStatusView


class TaskboxError(Exception):
    """Base of every error the client raises."""


class ApiError(TaskboxError):
    """The api answered an error; ``problem`` is its problem document.

    A body that is not a problem document (a proxy's page, the server's plain-text 503
    when its connection limit is reached) is turned into one whose ``detail`` is the
    body's text, so ``problem`` is always there.
    """

    def __init__(self, status: int, problem: Problem) -> None:
        super().__init__(f"{status} {problem.title}: {problem.detail}")
        self.status = status
        self.problem = problem

    @property
    def detail(self) -> str:
        return self.problem.detail

    @property
    def request_id(self) -> str | None:
        """The request's X-Request-ID: quote it and the server's log lines are found."""
        return self.problem.request_id


class Unauthorized(ApiError):
    """401: the API key is missing or not one of the server's ``API_KEYS``."""


class NotFound(ApiError):
    """404: no task has this id."""


class Conflict(ApiError):
    """409: the task already finished (cancel), or the Idempotency-Key was used for
    another request (create)."""


class InvalidRequest(ApiError):
    """422: the request is invalid; ``problem.errors`` says where."""


class ServiceUnavailable(ApiError):
    """503 still answered after the client's retries ran out."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    422: InvalidRequest,
    503: ServiceUnavailable,
}


def api_error(status: int, problem: Problem) -> ApiError:
    """The most specific ``ApiError`` for ``status``."""
    return _BY_STATUS.get(status, ApiError)(status, problem)


class TransportError(TaskboxError):
    """The api could not be reached, or the connection failed, and retrying was not
    safe or did not help. ``__cause__`` is httpx's error."""


class WaitTimeout(TaskboxError, TimeoutError):
    """``wait()`` ran out of time before the task finished; ``last_status`` is the
    status it saw last."""

    def __init__(self, task_id: uuid.UUID, timeout: float, last_status: TaskStatusView) -> None:
        super().__init__(
            f"task {task_id} still {last_status.status.value} after {timeout:g}s of waiting"
        )
        self.task_id = task_id
        self.timeout = timeout
        self.last_status = last_status
