"""Reading a batch create: every invalid task reported at once, by its position.

The body is parsed as FastAPI parses the single create's (the standard library's json,
then the strict model over Python objects), so a task means the same, and fails the
same way, in a batch and on its own. Validating the whole body against
``TaskBatchCreate`` is the fast path and enough when the batch is well formed. When it
is not, pydantic names the tasks that failed its checks but the others never reach the
service's own checks (task type, payload model, limits), so a client fixing one round
of errors would meet the next round only on the next try. On that (rare) path the
tasks pydantic accepted are validated one by one so the service can check them too,
and the 422 lists everything.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from api.schemas import TaskBatchCreate, TaskCreate

Problems = list[dict[str, Any]]


def _problem(error: Any) -> dict[str, Any]:
    return {"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]}


def _item_position(loc: tuple[Any, ...]) -> int | None:
    """The task a pydantic error location points into, or None for the envelope."""
    if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
        return loc[1]
    return None


def read_batch(raw: bytes) -> tuple[list[tuple[int, TaskCreate]], Problems]:
    """The tasks that passed the schema, with their positions, and the problems found.

    No problems: every task, in order. Problems in the envelope (not JSON, not an
    object, ``tasks`` missing or of the wrong length): no tasks at all.
    """
    try:
        document = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        return [], [{"loc": ["body"], "msg": f"Invalid JSON: {exc}", "type": "json_invalid"}]
    try:
        batch = TaskBatchCreate.model_validate(document)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        problems = [_problem(error) for error in errors]
        failed = {_item_position(error["loc"]) for error in errors}
        if None in failed:
            return [], problems
        passed = [
            (position, TaskCreate.model_validate(item))
            for position, item in enumerate(document["tasks"])
            if position not in failed
        ]
        return passed, problems
    return list(enumerate(batch.tasks)), []
