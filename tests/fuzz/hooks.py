"""Schemathesis hooks of ``make fuzz``: input that Postgres, asyncpg or the encoder refuse.

Schemathesis draws text from what UTF-8 can encode and moments from ordinary dates, so
on its own it sent (almost) none of what once made the api answer 500: a NUL in a query
parameter (Postgres refuses it in text), a lone surrogate in a body's key (its 422 could
not be encoded), a moment that an offset carries outside years 1-9999 in UTC (asyncpg
cannot send it) or onto their very ends (it sends those as infinities), a forged cursor
holding one. These hooks mix such values into what it
generates, about one request in three:

- every ``date-time`` is drawn from ordinary moments and from the ends of the range,
  with any offset (so some fall outside it in UTC);
- a NUL goes into one string of the query (values and list items) or the path;
- a NUL or a lone surrogate goes into one string or key of a JSON body, or a new key,
  whose task often has a registered type (so that the payload is checked at all);
- the list's ``cursor`` is sometimes forged around such a moment.

Headers get none of this: uvicorn's parser answers a NUL in a header with its own 400
before the app sees it, and a header is latin-1, where no surrogate exists. Nor does a
URL carry a lone surrogate: it has no UTF-8 form to percent-encode.

Loaded by ``schemathesis.toml`` (``hooks``), from the repository root.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import schemathesis
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import HookContext

from taskbox.api import pagination
from taskbox.api.schemas import TaskCreate
from taskbox.tasktypes import load_registry

NUL = "\x00"
# A high and a low surrogate, each alone: neither has a UTF-8 form.
LONE_SURROGATES = ("\ud800", "\udfff")

Path = tuple[str | int, ...]

# ------------------------------------------------------------------------- moments

_OFFSETS = st.just("Z") | st.builds(
    "{}{:02d}:{:02d}".format, st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59)
)
_ORDINARY_MOMENTS = st.builds(
    lambda moment, offset: moment.isoformat() + offset, st.datetimes(), _OFFSETS
)
# The first and last moments Python has, at any offset: year 1 at +01:00 is year 0 in
# UTC and 9999-12-31T23:59:59.999999-01:00 is in year 10000; at Z they are the very
# ends, which asyncpg sends as -infinity and infinity (refused as well); with the offset
# the other way they are inside the range and must be accepted.
EDGE_MOMENTS = st.builds(
    "{}{}".format,
    st.sampled_from(["0001-01-01T00:00:00", "9999-12-31T23:59:59.999999"]),
    _OFFSETS,
)
schemathesis.openapi.format("date-time", _ORDINARY_MOMENTS | EDGE_MOMENTS)


def _forged_cursor(moment: str, task_id: uuid.UUID) -> str:
    return pagination.encode(datetime.fromisoformat(moment), task_id)


FORGED_CURSORS = st.builds(_forged_cursor, EDGE_MOMENTS, st.uuids())

# ------------------------------------------------------------------------- spoiling text


def _spoil(text: str, character: str, at: int) -> str:
    at = min(at, len(text))
    return text[:at] + character + text[at:]


def _sites(document: Any, path: Path = (), *, keys: bool) -> Iterator[tuple[str, Path, Any]]:
    """Where a document can carry bad text: ("text", path, None) for each string,
    ("key", path, key) for each key and ("new key", path, None) for each object."""
    if isinstance(document, str):
        yield "text", path, None
    elif isinstance(document, dict):
        if keys:
            yield "new key", path, None
        for key, item in document.items():
            if keys:
                yield "key", path, key
            yield from _sites(item, (*path, key), keys=keys)
    elif isinstance(document, list):
        for index, item in enumerate(document):
            yield from _sites(item, (*path, index), keys=keys)


def _replaced(document: Any, path: Path, change: Callable[[Any], Any]) -> Any:
    """A copy of ``document`` with the node at ``path`` changed; the rest is shared."""
    if not path:
        return change(document)
    head, rest = path[0], path[1:]
    if isinstance(document, dict):
        return {**document, head: _replaced(document[head], rest, change)}
    items = list(document)
    assert isinstance(head, int)
    items[head] = _replaced(items[head], rest, change)
    return items


def _spoiled(document: Any, site: tuple[str, Path, Any], character: str, at: int) -> Any:
    kind, path, key = site
    if kind == "text":
        return _replaced(document, path, lambda text: _spoil(text, character, at))
    if kind == "key":
        return _replaced(
            document,
            path,
            lambda node: {
                (_spoil(k, character, at) if k == key else k): v for k, v in node.items()
            },
        )
    return _replaced(document, path, lambda node: {**node, _spoil("key", character, at): 1})


def sometimes_spoiled(
    document: Any,
    characters: tuple[str, ...],
    *,
    keys: bool,
    extra: list[st.SearchStrategy[Any]] | None = None,
) -> st.SearchStrategy[Any]:
    """``document`` as generated or, about one time in three, with one of ``characters``
    in one of its strings (or keys), or drawn from ``extra``."""
    sites = list(_sites(document, keys=keys))
    spoilers = list(extra or [])
    if sites:
        spoilers.append(
            st.builds(
                _spoiled,
                st.just(document),
                st.sampled_from(sites),
                st.sampled_from(characters),
                st.integers(0, 8),
            )
        )
    if not spoilers:
        return st.just(document)
    return st.sampled_from((False, False, True)).flatmap(
        lambda spoil: st.one_of(spoilers) if spoil else st.just(document)
    )


# ------------------------------------------------------------------------- hooks


@schemathesis.hook
def flatmap_query(context: HookContext, query: dict[str, Any] | None) -> st.SearchStrategy[Any]:
    extra = []
    cursor = context.operation.query.get("cursor") if context.operation is not None else None
    # A cursor is forged only in place of a valid one (or none): replacing the invalid
    # cursor of a negative case would make the case valid, and its 200 a false failure.
    if cursor is not None and (query is None or cursor.is_valid(query.get("cursor"))):
        extra.append(st.builds(lambda forged: {**(query or {}), "cursor": forged}, FORGED_CURSORS))
    return sometimes_spoiled(query, (NUL,), keys=False, extra=extra)


@schemathesis.hook
def flatmap_path_parameters(
    context: HookContext, path_parameters: dict[str, Any] | None
) -> st.SearchStrategy[Any]:
    return sometimes_spoiled(path_parameters, (NUL,), keys=False)


# A generated task's type is almost never one the api knows, and the service checks the
# type first: the payload's own checks and the schedule's were reached only through the
# document's examples. Half the bodies get a registered type in every task.
TASK_TYPES = load_registry([]).names()  # the built-ins, which the fuzzed api serves


def _valid_type(value: Any) -> bool:
    try:
        TaskCreate.model_validate({"type": value})
    except ValidationError:
        return False
    return True


def _with_type(document: Any, task_type: str) -> Any:
    """``document`` with ``task_type`` as the type of its task (a create) or of each of
    its tasks (a batch). Only a type the document already accepts is replaced: an
    invalid one may be all that makes a negative case invalid."""
    if not isinstance(document, dict):
        return document
    if isinstance(document.get("tasks"), list):
        return {**document, "tasks": [_with_type(task, task_type) for task in document["tasks"]]}
    return {**document, "type": task_type} if _valid_type(document.get("type")) else document


@schemathesis.hook
def flatmap_body(context: HookContext, body: Any) -> st.SearchStrategy[Any]:
    typed = st.just(body) | st.sampled_from(TASK_TYPES).map(lambda name: _with_type(body, name))
    return typed.flatmap(
        lambda document: sometimes_spoiled(document, (NUL, *LONE_SURROGATES), keys=True)
    )
