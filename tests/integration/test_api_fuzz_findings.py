"""What ``make fuzz`` (schemathesis, tests/fuzz) found, held here as plain regressions."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.integration.test_api_tasks import TASKS, assert_field_errors, assert_problem


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


async def test_a_body_that_is_not_utf8_is_a_documented_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        TASKS, content=b'{"type": "\xff"}', headers={"Content-Type": "application/json"}
    )
    assert_problem(response, 400)
    schema = (await client.get("/openapi.json")).json()
    documented = schema["paths"][TASKS]["post"]["responses"]["400"]["content"]
    assert set(documented) == {"application/problem+json"}
