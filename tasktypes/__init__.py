"""Deprecated: the handler API's old import name, kept for one release.

Handler modules written before the ``taskbox`` package (``from tasktypes import task``)
keep working unchanged: every name here is the object ``taskbox`` exports, so handlers
registered through either name land in the same registry. Importing this package warns
(``DeprecationWarning``) and the consumer logs the module that did; change the import to
``from taskbox import task, TaskContext, PermanentError, Retry``. Removed in 0.3.
"""

import sys
import warnings

# Every name of the handler API, as the very objects taskbox.tasktypes has.
from taskbox.tasktypes import *  # noqa: F403
from taskbox.tasktypes import __all__ as __all__

DEPRECATION = (
    "the 'tasktypes' package is deprecated and will be removed in Taskbox 0.3: import "
    "from 'taskbox' instead (from taskbox import task, TaskContext, PermanentError, Retry)"
)


def _importer() -> str:
    """The file and line of the import that ran this module: past the import machinery
    (frame 2 is this module's importer, often importlib's own)."""
    frame = sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


# Read by the processes' loader of TASK_MODULES, which logs where to change the import.
IMPORTED_FROM = _importer()
# stacklevel 2: the importer; warnings itself skips importlib's frames
warnings.warn(DEPRECATION, DeprecationWarning, stacklevel=2)
