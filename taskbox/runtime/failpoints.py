"""Named crash points for fault tests: ``TASKBOX_FAILPOINTS=consumer.after_commit``.

A listed point ends the process with SIGKILL semantics (no cleanup, no ack, no commit),
which is how the tests prove what a kill -9 at exactly that line does. Unset in
production, where ``hit`` costs one set lookup.
"""

from __future__ import annotations

import os
import sys

_ARMED = frozenset(filter(None, os.environ.get("TASKBOX_FAILPOINTS", "").split(",")))


def hit(name: str) -> None:
    if name in _ARMED:
        sys.stderr.write(f"failpoint {name}: killing the process\n")
        sys.stderr.flush()
        os._exit(137)
