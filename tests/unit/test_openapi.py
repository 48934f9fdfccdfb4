"""taskbox.api.app's OpenAPI post-processing: a 422 only where FastAPI's validation can refuse."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, FastAPI, Header, Path, Query

from taskbox.api.app import _document_responses
from taskbox.api.schemas import TaskCreate


def _responses(included: bool) -> dict[tuple[str, str], set[str]]:
    """Each operation's documented statuses, the routes included through a router (as
    the app's are) or added to the app's own router."""
    app = FastAPI()
    router = APIRouter(prefix="/r")

    @router.get("/uuid/{item:uuid}")
    async def by_uuid(item: uuid.UUID) -> None: ...

    @router.delete("/uuid/{item:uuid}/child/{other:uuid}")
    async def two_uuids(item: uuid.UUID, other: uuid.UUID) -> None: ...

    @router.get("/int/{item:int}")  # the converter gives an int, not a UUID
    async def other_converter(item: int) -> None: ...

    @router.get("/bounded/{item:uuid}")
    async def with_query(item: uuid.UUID, limit: Annotated[int, Query(ge=1)] = 1) -> None: ...

    @router.get("/header/{item:uuid}")
    async def with_header(
        item: uuid.UUID, key: Annotated[str | None, Header(max_length=3)] = None
    ) -> None: ...

    @router.post("/body/{item:uuid}")
    async def with_body(item: uuid.UUID, body: TaskCreate) -> None: ...

    @router.get("/described/{item:uuid}")
    async def described(item: Annotated[uuid.UUID, Path(description="x")]) -> None: ...

    @router.get("/nothing")
    async def nothing() -> None: ...

    if included:
        app.include_router(router)
    else:
        for route in router.routes:
            app.router.routes.append(route)
    _document_responses(app)
    schema: dict[str, Any] = app.openapi()
    return {
        (path, method): set(operation["responses"])
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    }


@pytest.mark.parametrize("included", [True, False])
def test_a_422_is_dropped_only_where_no_parameter_can_be_invalid(included: bool) -> None:
    responses = _responses(included)
    assert len(responses) == 8
    has_422 = {op for op, statuses in responses.items() if "422" in statuses}
    assert has_422 == {
        ("/r/int/{item}", "get"),
        ("/r/bounded/{item}", "get"),
        ("/r/header/{item}", "get"),
        ("/r/body/{item}", "post"),
    }


def test_fastapis_validation_schemas_go_with_the_last_422_that_uses_them() -> None:
    app = FastAPI()

    @app.get("/only/{item:uuid}")
    async def only(item: uuid.UUID) -> None: ...

    _document_responses(app)
    schema = app.openapi()
    assert "422" not in schema["paths"]["/only/{item}"]["get"]["responses"]
    assert "HTTPValidationError" not in schema.get("components", {}).get("schemas", {})

    kept = FastAPI()

    @kept.get("/bounded/{item:uuid}")
    async def bounded(item: uuid.UUID, limit: Annotated[int, Query(ge=1)] = 1) -> None: ...

    _document_responses(kept)
    schemas = kept.openapi()["components"]["schemas"]
    assert {"HTTPValidationError", "ValidationError"} <= set(schemas)
