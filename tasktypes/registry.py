"""Registered task types and how user modules are loaded."""

from __future__ import annotations

import importlib
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

P = TypeVar("P", bound=BaseModel)
Handler = Callable[[Any, "TaskContext"], Awaitable[Any]]


class PermanentError(Exception):
    """Raise from a handler to fail the task at once, without further attempts."""


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a handler may want to know about the attempt it runs."""

    task_id: uuid.UUID
    attempt: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class TaskType:
    name: str
    payload_model: type[BaseModel]
    handler: Handler
    timeout: float | None  # seconds; None means the consumer's default

    def parse_payload(self, payload: Any) -> BaseModel:
        """Validate a payload; raises pydantic.ValidationError."""
        return self.payload_model.model_validate(payload)


class TaskRegistry:
    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}

    def register(
        self,
        name: str,
        payload_model: type[P],
        handler: Callable[[P, TaskContext], Awaitable[Any]],
        *,
        timeout: float | None = None,
    ) -> TaskType:
        if name in self._types and self._types[name].handler is not handler:
            raise ValueError(f"task type {name!r} is already registered")
        task_type = TaskType(name, payload_model, handler, timeout)
        self._types[name] = task_type
        return task_type

    def get(self, name: str) -> TaskType | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __len__(self) -> int:
        return len(self._types)

    def without(self, names: Iterable[str]) -> TaskRegistry:
        """A new registry with every type of this one but ``names``."""
        excluded = set(names)
        registry = TaskRegistry()
        registry._types = {name: t for name, t in self._types.items() if name not in excluded}
        return registry


default_registry = TaskRegistry()


def task(
    name: str, payload_model: type[P], *, timeout: float | None = None
) -> Callable[
    [Callable[[P, TaskContext], Awaitable[Any]]], Callable[[P, TaskContext], Awaitable[Any]]
]:
    """Register the decorated ``async def handler(payload, ctx)`` under ``name``."""

    def decorate(
        handler: Callable[[P, TaskContext], Awaitable[Any]],
    ) -> Callable[[P, TaskContext], Awaitable[Any]]:
        default_registry.register(name, payload_model, handler, timeout=timeout)
        return handler

    return decorate


def load_registry(modules: Iterable[str], *, builtin_types: bool = True) -> TaskRegistry:
    """Import the built-ins and every module in ``modules``; their decorators register
    in ``default_registry``, which is returned.

    Without ``builtin_types`` (BUILTIN_TASK_TYPES=false) the result is a copy without
    the built-in demo types. They are still imported, so their names stay taken: a
    module cannot register an ``echo`` of its own either way.
    """
    builtins = importlib.import_module("tasktypes.builtins")
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RuntimeError(
                f"TASK_MODULES names {module!r}, which cannot be imported: {exc}"
            ) from exc
    if builtin_types:
        return default_registry
    return default_registry.without(builtins.NAMES)
