"""Task responses serialised straight from database rows.

A route that returns a pydantic model gets it validated and serialised again by
FastAPI; on the hot POST that was the largest cost after the insert itself. The rows
already have the right types (asyncpg decodes uuid, timestamptz and jsonb), so orjson
writes them directly. The routes keep their pydantic response models for the OpenAPI
document, and a unit test holds this output to those models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from fastapi.responses import Response
from pydantic import BaseModel

from taskbox.api.schemas import Task, TaskStatusView, TaskSummary

TASK_FIELDS = tuple(Task.model_fields)
SUMMARY_FIELDS = tuple(TaskSummary.model_fields)
STATUS_FIELDS = tuple(TaskStatusView.model_fields)
_OPTIONS = orjson.OPT_UTC_Z  # "...Z", as pydantic writes UTC timestamps


def task_document(row: Mapping[str, Any], fields: tuple[str, ...] = TASK_FIELDS) -> dict[str, Any]:
    document = {field: row[field] for field in fields}
    # asyncpg's own UUID class is not one orjson knows
    document["id"] = str(document["id"])
    return document


def component_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema for an OpenAPI document whose components hold the
    models it refers to (FastAPI puts them there for the routes that use them)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    return schema


def json_response(
    document: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(document, option=_OPTIONS),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def task_response(
    row: Mapping[str, Any], status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return json_response(task_document(row), status_code, headers)


def status_response(row: Mapping[str, Any]) -> Response:
    document = {field: row[field] for field in STATUS_FIELDS}
    document["id"] = str(document["id"])
    return json_response(document)


def batch_response(rows: Iterable[Mapping[str, Any]]) -> Response:
    return json_response({"items": [task_document(row) for row in rows]}, 201)


def page_response(
    rows: Iterable[Mapping[str, Any]], next_cursor: str | None, *, full: bool = False
) -> Response:
    """A page of the list: summaries (``TaskSummaryPage``), or whole tasks with ``full``
    (``TaskPage``)."""
    fields = TASK_FIELDS if full else SUMMARY_FIELDS
    return json_response(
        {"items": [task_document(row, fields) for row in rows], "next_cursor": next_cursor}
    )
