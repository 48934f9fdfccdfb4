"""Responses that every operation taking a JSON body documents alike."""

from __future__ import annotations

from typing import Any

from taskbox.api.schemas import Problem

Responses = dict[int | str, dict[str, Any]]

# Both answered by the middleware (api.middleware) before the route runs.
TOO_LARGE: Responses = {
    413: {"model": Problem, "description": "The request body is larger than MAX_BODY_BYTES"}
}
NOT_JSON: Responses = {
    415: {
        "model": Problem,
        "description": "The body is not declared JSON: its Content-Type is missing, or is "
        "not application/json or a +json type",
    }
}
