"""Task types: the registry of handlers and their payload models.

The API reads the registry to reject unknown types and invalid payloads with a 422;
the consumer reads it to run handlers. A user module adds its own types with the
``task`` decorator (hooks with ``on``) and is loaded through the ``TASK_MODULES`` setting.
"""

from taskbox.tasktypes.periodic import Periodic
from taskbox.tasktypes.registry import (
    AttemptEvent,
    Hook,
    HookEvent,
    PermanentError,
    Retry,
    TaskContext,
    TaskRegistry,
    TaskType,
    cron,
    default_registry,
    every,
    load_registry,
    on,
    periodic,
    task,
)

__all__ = [
    "AttemptEvent",
    "Hook",
    "HookEvent",
    "Periodic",
    "PermanentError",
    "Retry",
    "TaskContext",
    "TaskRegistry",
    "TaskType",
    "cron",
    "default_registry",
    "every",
    "load_registry",
    "on",
    "periodic",
    "task",
]
