"""The hand-rolled task responses say exactly what the documented pydantic models say."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from asyncpg.pgproto import pgproto

from taskbox.api import rendering
from taskbox.api.schemas import Task, TaskPage, TaskStatusView, TaskSummary, TaskSummaryPage


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        # the class asyncpg hands out for uuid columns, which orjson cannot write as is
        "id": pgproto.UUID("0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11"),
        "type": "echo",
        "status": "DONE",
        "priority": 3,
        "payload": {"x": [1, 2.5, None, "é"], "nested": {"k": True}},
        "result": {"x": 1},
        "error": {"type": "DrillFailure", "message": "drill"},
        "attempts": 2,
        "max_attempts": 3,
        "cancel_requested": False,
        "created_at": datetime(2026, 11, 26, 12, 0, 0, 1, tzinfo=UTC),
        "updated_at": datetime(2026, 11, 26, 12, 0, 1, 0, tzinfo=UTC),
        "started_at": datetime(2026, 11, 26, 12, 0, 0, 500000, tzinfo=UTC),
        "finished_at": None,
        "run_at": None,
        "queue": "default",
        # columns the API does not show
        "worker_id": "host:1:abc",
        "heartbeat_at": None,
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    "task",
    [
        row(),
        row(result=None, error=None, status="NEW", started_at=None),
        row(result=[1, "two"], finished_at=datetime(2026, 1, 1, tzinfo=UTC)),
        row(result="text"),
        row(status="NEW", run_at=datetime(2026, 12, 24, 18, 0, tzinfo=UTC)),
    ],
)
def test_a_task_renders_as_its_model_does(task: dict[str, Any]) -> None:
    expected = Task.model_validate(task).model_dump(mode="json")
    assert orjson.loads(rendering.task_response(task).body) == expected
    assert "worker_id" not in orjson.loads(rendering.task_response(task).body)


def test_timestamps_are_written_like_pydantic_writes_them() -> None:
    task = row()
    rendered = orjson.loads(rendering.task_response(task).body)
    assert rendered["created_at"] == "2026-11-26T12:00:00.000001Z"
    assert rendered["created_at"] == Task.model_validate(task).model_dump(mode="json")["created_at"]


def test_status_and_page_render_as_their_models() -> None:
    task = row()
    status = orjson.loads(rendering.status_response(task).body)
    assert status == TaskStatusView.model_validate(task).model_dump(mode="json")
    rows = [task, row(type="sleep")]
    page = orjson.loads(rendering.page_response(rows, "abc").body)
    assert page == TaskSummaryPage.model_validate({"items": rows, "next_cursor": "abc"}).model_dump(
        mode="json"
    )
    full = orjson.loads(rendering.page_response(rows, None, full=True).body)
    assert full == TaskPage.model_validate({"items": rows, "next_cursor": None}).model_dump(
        mode="json"
    )


def test_a_summary_is_the_task_without_payload_and_result() -> None:
    summary = orjson.loads(rendering.page_response([row()], None).body)["items"][0]
    assert (
        set(summary)
        == set(TaskSummary.model_fields)
        == set(Task.model_fields)
        - {
            "payload",
            "result",
        }
    )
    # A summary row from the database has no payload or result to render.
    bare = {k: v for k, v in row().items() if k not in ("payload", "result")}
    assert orjson.loads(rendering.page_response([bare], None).body)["items"] == [summary]


def test_headers_and_status_code_pass_through() -> None:
    response = rendering.task_response(row(), 201, {"Location": "/api/v1/tasks/x"})
    assert response.status_code == 201
    assert response.headers["location"] == "/api/v1/tasks/x"
    assert response.media_type == "application/json"
