"""Deprecated alias of ``taskbox.tasktypes.registry`` (see ``tasktypes``): the same module
object, so its registry and classes are the ones ``taskbox`` uses."""

import sys

import taskbox.tasktypes.registry as _module
from taskbox.tasktypes.registry import *  # noqa: F403 (the names, for type checkers)

sys.modules[__name__] = _module
