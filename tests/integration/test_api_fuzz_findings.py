"""What ``make fuzz`` (schemathesis, tests/fuzz) found, held here as plain regressions."""

from __future__ import annotations

import uuid

import asyncpg
import httpx
import pytest

from tests.integration.test_api_tasks import (
    TASKS,
    assert_field_errors,
    assert_problem,
    row_counts,
)


async def test_a_405_allows_every_method_of_the_path(client: httpx.AsyncClient) -> None:
    # Starlette named only the methods of the first route whose path matched.
    response = await client.put(TASKS)
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET, POST"
    response = await client.post(f"{TASKS}/{uuid.UUID(int=3)}")
    assert_problem(response, 405)
    assert response.headers["allow"] == "DELETE, GET"


@pytest.mark.parametrize("value", ["0.5", "1700000000", "-1", "1e9", " 12 "])
async def test_a_number_is_not_a_timestamp(client: httpx.AsyncClient, value: str) -> None:
    # pydantic read these as Unix seconds: created_before=0.5 meant 1970 and listed nothing.
    for name in ("created_after", "created_before"):
        response = await client.get(TASKS, params={name: value})
        assert_field_errors(
            response,
            [
                (
                    ["query", name],
                    f"Value error, {value!r} is not an ISO 8601 timestamp, "
                    "e.g. 2026-12-24T18:00:00Z",
                    "value_error",
                )
            ],
        )


@pytest.mark.parametrize("value", ["2026-11-26T12:00:00Z", "2026-11-26T12:00:00+01:00"])
async def test_iso_timestamps_still_filter(client: httpx.AsyncClient, value: str) -> None:
    response = await client.get(TASKS, params={"created_before": value})
    assert response.status_code == 200, response.text


# Bodies the json module cannot read as text at all. FastAPI answers the single create
# 400 for each; the batch, which reads its own body, answered 422 (not UTF-8, a long
# integer) and 500 (deep nesting: a RecursionError) while documenting the 400.
UNREADABLE = {
    "not UTF-8": b'{"tasks": [{"type": "\xff"}], "type": "\xff"}',
    "nested too deeply": b"[" * 100_000,
    "an integer too long to read": b'{"tasks": [{"type": "echo", "payload": {"n": '
    + b"1" * 5000
    + b"}}]}",
}


@pytest.mark.parametrize("path", [TASKS, f"{TASKS}/batch"])
@pytest.mark.parametrize("body", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_a_body_that_cannot_be_read_is_the_documented_400_on_both_creates(
    client: httpx.AsyncClient, pool: asyncpg.Pool, path: str, body: bytes
) -> None:
    response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    problem = assert_problem(response, 400)
    assert problem["detail"] == "There was an error parsing the body"
    assert "errors" not in problem
    assert await row_counts(pool) == (0, 0)
    schema = (await client.get("/openapi.json")).json()
    documented = schema["paths"][path]["post"]["responses"]["400"]
    assert set(documented["content"]) == {"application/problem+json"}
    assert documented["content"]["application/problem+json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"
    }


@pytest.mark.parametrize("path", [TASKS, f"{TASKS}/batch"])
async def test_a_body_that_is_text_but_not_json_stays_a_422_on_both_creates(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.post(
        path, content=b'{"tasks": [', headers={"Content-Type": "application/json"}
    )
    problem = assert_problem(response, 422)
    assert [error["type"] for error in problem["errors"]] == ["json_invalid"]


# The task id's operations documented the 422 FastAPI adds for a path parameter, but a
# `{task_id:uuid}` route never hands its validation anything but a UUID: an id that is
# none matches no route and is a 404 (api.errors).
TASK_ID_OPERATIONS = [
    ("get", f"{TASKS}/{{task_id}}/events"),
    ("delete", f"{TASKS}/{{task_id}}"),
]
# The two GETs take `wait` as well (a 422 when it is invalid) and answer a malformed id
# with the same 404.
WAITING_TASK_ID_OPERATIONS = [
    ("get", f"{TASKS}/{{task_id}}"),
    ("get", f"{TASKS}/{{task_id}}/status"),
]
MALFORMED_IDS = [
    "not-a-uuid",
    "12345",
    f"{uuid.UUID(int=5)}0",  # one digit too many
    str(uuid.UUID(int=5)).replace("0", "g", 1),  # not hex
    f"{uuid.UUID(int=5)}.json",
]
# Forms the converter takes: they reach the route, whose validation accepts them.
ODD_BUT_WELL_FORMED_IDS = [
    uuid.UUID(int=6).hex.upper(),
    uuid.UUID(int=7).hex,
    str(uuid.UUID(int=8)).replace("-", "", 2),
]


@pytest.mark.parametrize(("method", "template"), TASK_ID_OPERATIONS)
async def test_a_task_id_operation_documents_the_404_it_answers_and_no_422(
    client: httpx.AsyncClient, pool: asyncpg.Pool, method: str, template: str
) -> None:
    schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"][template][method]
    assert [p["name"] for p in operation.get("parameters", [])] == ["task_id"]
    assert "requestBody" not in operation
    responses = operation["responses"]
    assert "422" not in responses, sorted(responses)
    assert responses["404"]["content"] == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
    }

    for task_id in MALFORMED_IDS:
        response = await client.request(method, template.format(task_id=task_id))
        body = assert_problem(response, 404)
        assert body["detail"] == f"no task has the id {task_id!r}: task ids are UUIDs"
    for task_id in ODD_BUT_WELL_FORMED_IDS:
        response = await client.request(method, template.format(task_id=task_id))
        body = assert_problem(response, 404)
        assert body["detail"] == f"task {uuid.UUID(task_id)} does not exist"
    assert await row_counts(pool) == (0, 0)


@pytest.mark.parametrize(("method", "template"), WAITING_TASK_ID_OPERATIONS)
async def test_a_waiting_get_answers_a_malformed_id_with_404_and_a_bad_wait_with_422(
    client: httpx.AsyncClient, method: str, template: str
) -> None:
    schema = (await client.get("/openapi.json")).json()
    operation = schema["paths"][template][method]
    assert [p["name"] for p in operation["parameters"]] == ["task_id", "wait"]
    for task_id in MALFORMED_IDS:
        response = await client.request(method, template.format(task_id=task_id))
        assert_problem(response, 404)
    url = template.format(task_id=uuid.UUID(int=9))
    response = await client.request(method, url, params={"wait": "-0.5"})
    body = assert_problem(response, 422)
    assert body["errors"][0]["loc"] == ["query", "wait"]


async def test_every_documented_422_is_a_problem_and_fastapis_own_schema_is_gone(
    client: httpx.AsyncClient,
) -> None:
    schema = (await client.get("/openapi.json")).json()
    with_422 = sorted(
        (path, method)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if "422" in operation["responses"]
    )
    # Each of these takes a body, a query, a header or a name that can be invalid.
    assert with_422 == [
        ("/api/v1/queues/{name}", "get"),
        ("/api/v1/queues/{name}/pause", "post"),
        ("/api/v1/queues/{name}/resume", "post"),
        ("/api/v1/schedules", "post"),
        ("/api/v1/schedules/{name}", "delete"),
        ("/api/v1/schedules/{name}", "get"),
        ("/api/v1/schedules/{name}", "patch"),
        ("/api/v1/schedules/{name}/pause", "post"),
        ("/api/v1/schedules/{name}/resume", "post"),
        ("/api/v1/schedules/{name}/run", "post"),
        ("/api/v1/task-actions", "get"),
        ("/api/v1/task-actions/{action_id}", "get"),
        (TASKS, "get"),
        (TASKS, "post"),
        (f"{TASKS}/batch", "post"),
        (f"{TASKS}/cancel", "post"),
        (f"{TASKS}/events", "get"),
        (f"{TASKS}/retry", "post"),
        (f"{TASKS}/{{task_id}}", "get"),
        (f"{TASKS}/{{task_id}}/status", "get"),
        ("/api/v1/webhooks", "post"),
        ("/api/v1/webhooks/{webhook_id}", "patch"),
        ("/api/v1/webhooks/{webhook_id}/deliveries", "get"),
    ]
    for path, method in with_422:
        content = schema["paths"][path][method]["responses"]["422"]["content"]
        assert content == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
    assert not {"HTTPValidationError", "ValidationError"} & set(schema["components"]["schemas"])


async def test_every_operation_documented_without_a_422_answers_a_malformed_id_with_404(
    client: httpx.AsyncClient,
) -> None:
    # api.app drops the 422 from operations whose only parameters are UUID path ids,
    # trusting that each such id is read by a `{name:uuid}` converter: this holds every
    # such operation, present and future, to it. A route declared `/{task_id}` with a
    # uuid.UUID annotation would answer 422 here and fail.
    schema = (await client.get("/openapi.json")).json()
    checked = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            ids = [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]
            if not ids or "422" in operation["responses"]:
                continue
            url = path
            for name in ids:
                url = url.replace("{" + name + "}", "not-a-uuid")
            response = await client.request(method.upper(), url)
            assert response.status_code == 404, (method, path, response.text)
            checked.append((method, path))
    assert len(checked) == 9, checked
