"""taskbox.api.errors.route_path: the path the key gate and the 404 decide on, read as Starlette
routes it (the gate is the only API-key check of the task routes)."""

from __future__ import annotations

import pytest

from taskbox.api.errors import route_path


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/api/v1/tasks", "", "/api/v1/tasks"),
        ("/taskbox/api/v1/tasks", "/taskbox", "/api/v1/tasks"),
        ("/taskbox", "/taskbox", ""),
        # A prefix counts only up to a "/": Starlette routes this path as itself.
        ("/api/v1/tasks", "/api/v1/task", "/api/v1/tasks"),
        ("/other/api/v1/tasks", "/taskbox", "/other/api/v1/tasks"),
    ],
)
def test_route_path_reads_the_path_as_starlette_routes_it(
    path: str, root_path: str, expected: str
) -> None:
    assert route_path({"type": "http", "path": path, "root_path": root_path}) == expected
