"""The task events migration 0008's trigger sends: the channel and the payload's shape.

Every statement that changes tasks' statuses sends (creates send nothing: see the
migration for why), in its own transaction, one or a few NOTIFYs on CHANNEL, each a JSON array of
``[id, status, type, queue]``. They are delivered at commit, so a listener hears only
of committed changes, and never of one twice; a listener that was disconnected has
missed whatever was sent meanwhile and must re-read the database.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from taskbox.db.states import TaskStatus

CHANNEL = "taskbox_task_events"


@dataclass(frozen=True, slots=True)
class TaskEvent:
    task_id: uuid.UUID
    status: TaskStatus
    type: str
    queue: str


def parse_events(payload: str) -> list[TaskEvent]:
    """The events of one notification; raises ValueError on anything else."""
    entries = json.loads(payload)
    if not isinstance(entries, list):
        raise ValueError("a task events payload is a JSON array")
    events = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 4:
            raise ValueError(f"not a task event: {entry!r}")
        task_id, status, task_type, queue = entry
        events.append(TaskEvent(uuid.UUID(task_id), TaskStatus(status), str(task_type), str(queue)))
    return events
