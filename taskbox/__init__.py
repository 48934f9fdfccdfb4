"""Taskbox for its users: the one import root a program needs.

Handler authors write ``from taskbox import task, TaskContext, PermanentError, Retry``
(and ``cron``, ``every``, ``periodic`` for periodic tasks);
their tests use ``taskbox.testing``; a program that only submits tasks uses
``taskbox.client`` (``Client``, ``AsyncClient``).

``taskbox.client`` depends on ``httpx`` and ``pydantic`` only, never on the server's
packages (``api``, ``db``, ``tasktypes``, ...), so a program that only submits tasks
installs no server. Importing ``taskbox.client`` runs this module first, so the handler
API below is imported lazily (PEP 562): ``tasktypes`` loads on the first use of one of
its names, not before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskbox.tasktypes.registry import (
        AttemptEvent,
        HookEvent,
        PermanentError,
        Retry,
        TaskContext,
        TaskRegistry,
        cron,
        default_registry,
        every,
        on,
        periodic,
        task,
    )

__all__ = [
    "AttemptEvent",
    "HookEvent",
    "PermanentError",
    "Retry",
    "TaskContext",
    "TaskRegistry",
    "cron",
    "default_registry",
    "every",
    "on",
    "periodic",
    "task",
]

# Where each lazily imported name lives.
_HANDLER_API = "taskbox.tasktypes.registry"

if not TYPE_CHECKING:
    # Hidden from type checkers: to them the names are the imports above, and a name
    # that is not exported stays an error instead of becoming Any.

    def __getattr__(name: str) -> Any:
        if name not in __all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(_HANDLER_API), name)
        globals()[name] = value  # later lookups find it without this hook
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(__all__))
