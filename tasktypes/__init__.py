"""Deprecated: the handler API's old import name, kept for one release.

Handler modules written before the ``taskbox`` package (``from tasktypes import task``)
keep working unchanged: every name here is the object ``taskbox`` exports, so handlers
registered through either name land in the same registry. Importing this package warns
(``DeprecationWarning``) and the consumer logs the module that did; change the import to
``from taskbox import task, TaskContext, PermanentError, Retry``. Removed in 0.3.
"""

import sys
import warnings

from taskbox.tasktypes import (
    AttemptEvent,
    Hook,
    HookEvent,
    PermanentError,
    Retry,
    TaskContext,
    TaskRegistry,
    TaskType,
    default_registry,
    load_registry,
    on,
    task,
)

__all__ = [
    "AttemptEvent",
    "Hook",
    "HookEvent",
    "PermanentError",
    "Retry",
    "TaskContext",
    "TaskRegistry",
    "TaskType",
    "default_registry",
    "load_registry",
    "on",
    "task",
]

DEPRECATION = (
    "the 'tasktypes' package is deprecated and will be removed in Taskbox 0.3: import "
    "from 'taskbox' instead (from taskbox import task, TaskContext, PermanentError, Retry)"
)


def _importer_stacklevel() -> int:
    """The stacklevel of the frame whose import ran this module: the first frame that
    is not the import machinery, so the warning names the user's file and line."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    return level + 1


warnings.warn(DEPRECATION, DeprecationWarning, stacklevel=_importer_stacklevel())
