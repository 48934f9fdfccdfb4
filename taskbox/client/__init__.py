"""The typed client of the Taskbox task API.

    from taskbox.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as taskbox:
        task = taskbox.create("sha256", {"text": "hello"})
        done = taskbox.wait(task.id, timeout=30)

``AsyncClient`` is the same with ``await``. Results are pydantic models
(``taskbox.client.models``), errors the exceptions of ``taskbox.client.errors``.
"""

from taskbox.client._async import AsyncClient
from taskbox.client._core import NO_RETRIES, RetryPolicy
from taskbox.client._sync import Client
from taskbox.client.errors import (
    ApiError,
    Conflict,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    TaskboxError,
    TransportError,
    Unauthorized,
    WaitTimeout,
)
from taskbox.client.models import (
    NewTask,
    Problem,
    Task,
    TaskError,
    TaskStatus,
    TaskStatusView,
    TaskSummary,
)

__all__ = [
    "NO_RETRIES",
    "ApiError",
    "AsyncClient",
    "Client",
    "Conflict",
    "InvalidRequest",
    "NewTask",
    "NotFound",
    "Problem",
    "RetryPolicy",
    "ServiceUnavailable",
    "Task",
    "TaskError",
    "TaskStatus",
    "TaskStatusView",
    "TaskSummary",
    "TaskboxError",
    "TransportError",
    "Unauthorized",
    "WaitTimeout",
]
