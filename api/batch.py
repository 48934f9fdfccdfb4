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

A body that is not JSON text at all fails as FastAPI fails the single create's: a
syntax error is a 422 (``json_invalid``), and a body the json module cannot even read
(bytes that are not UTF-8, nesting deeper than the parser's recursion allows, an
integer too long to convert) is a 400, ``UnreadableBody``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from taskbox.api.schemas import TaskBatchCreate, TaskCreate

Problems = list[dict[str, Any]]


class UnreadableBody(ValueError):
    """The body is no text the json module can read; ``api.errors`` answers 400."""

    def __init__(self) -> None:
        # FastAPI's words for the same failure of the single create's body.
        super().__init__("There was an error parsing the body")


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
    object, ``tasks`` missing or of the wrong length): no tasks at all. Raises
    ``UnreadableBody`` for a body that cannot be read as JSON text at all.
    """
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        return [], [{"loc": ["body"], "msg": f"Invalid JSON: {exc}", "type": "json_invalid"}]
    except (ValueError, RecursionError) as exc:
        # Not UTF-8 (UnicodeDecodeError), an integer past int_max_str_digits, or nested
        # too deeply: FastAPI answers the single create's body 400 for each of these.
        raise UnreadableBody from exc
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
