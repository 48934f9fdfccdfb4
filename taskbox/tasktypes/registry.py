"""Registered task types, their per-type policy, the hooks around attempts, and how user
modules are loaded.

A ``TaskRegistry`` is an object a test can build: ``registry.task(...)`` registers a
handler on it and ``registry.on("failure")`` a hook. The module-level ``task`` and ``on``
decorators are conveniences that register on ``default_registry``, the one the api and
the consumer load (``load_registry``).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal, TypeVar

from pydantic import BaseModel

from taskbox.runtime.queues import DEFAULT_QUEUE, check_queue_name
from taskbox.schedules.timing import CatchUp, Timing
from taskbox.schedules.timing import cron as cron  # re-exported: taskbox.cron
from taskbox.schedules.timing import every as every  # re-exported: taskbox.every
from taskbox.tasktypes.periodic import Periodic

log = logging.getLogger(__name__)

P = TypeVar("P", bound=BaseModel)
# An ``async def`` runs on the consumer's event loop; a plain ``def`` in its thread pool.
Handler = Callable[[Any, "TaskContext"], Any]
HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])

HookEvent = Literal["start", "success", "failure", "retry"]
HOOK_EVENTS: tuple[HookEvent, ...] = ("start", "success", "failure", "retry")
# A hook gets one AttemptEvent; it may be a plain function or a coroutine function.
Hook = Callable[["AttemptEvent"], Awaitable[None] | None]
HookT = TypeVar("HookT", bound=Hook)


class PermanentError(Exception):
    """Raise from a handler to fail the task at once, without further attempts."""


class Retry(Exception):
    """Raise from a handler to ask for another attempt ``in_seconds`` from now (the
    type's backoff when None). It ends this attempt as a failed one: it counts against
    max_attempts, and on the last attempt the task fails."""

    def __init__(self, in_seconds: float | None = None, message: str = "") -> None:
        if in_seconds is not None and not (math.isfinite(in_seconds) and in_seconds >= 0):
            raise ValueError(
                f"Retry(in_seconds=...) must be a finite number >= 0, not {in_seconds!r}"
            )
        self.in_seconds = in_seconds
        super().__init__(message or "the handler asked for a retry")


@dataclass(frozen=True, slots=True)
class TaskContext:
    """What a handler may want to know about the attempt it runs."""

    task_id: uuid.UUID
    attempt: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class AttemptEvent:
    """What a hook is told. ``start`` comes before the handler runs; then exactly one of
    ``success`` (``result`` set), ``retry`` (``error`` and ``retry_in`` set) or
    ``failure`` (``error`` set: the task failed for good), unless the consumer stopped
    the attempt itself (cancel, shutdown, lost ownership, abandonment)."""

    event: HookEvent
    task_type: str
    context: TaskContext
    result: Any = None
    error: BaseException | None = None
    retry_in: float | None = None


@dataclass(frozen=True, slots=True)
class TaskType:
    name: str
    payload_model: type[BaseModel]
    handler: Handler
    timeout: float | None = None  # seconds; None means the consumer's HANDLER_TIMEOUT
    max_attempts: int | None = None  # for creates that omit it; None: DEFAULT_MAX_ATTEMPTS
    retry_base: float | None = None  # backoff before the 2nd attempt; None: RETRY_BASE_DELAY
    retry_max: float | None = None  # longest backoff; None: RETRY_MAX_DELAY
    # The queues a task of this type may be routed to; a create that names none gets
    # the first. A consumer runs the type when it serves any of them.
    queues: tuple[str, ...] = (DEFAULT_QUEUE,)
    # The randomised fraction of each backoff (0..1); None: the default 0.5
    retry_jitter: float | None = None

    @property
    def queue(self) -> str:
        """The type's own queue: where a create that names no queue routes its task."""
        return self.queues[0]

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)

    def parse_payload(self, payload: Any) -> BaseModel:
        """Validate a payload; raises pydantic.ValidationError."""
        return self.payload_model.model_validate(payload)


@dataclass(slots=True)
class Hooks:
    """The hooks of a registry, by event, in registration order."""

    by_event: dict[HookEvent, list[Hook]] = field(
        default_factory=lambda: {event: [] for event in HOOK_EVENTS}
    )

    def add(self, event: HookEvent, hook: Hook) -> None:
        if event not in self.by_event:
            raise ValueError(f"no hook event {event!r}; one of {', '.join(HOOK_EVENTS)}")
        self.by_event[event].append(hook)

    def __getitem__(self, event: HookEvent) -> list[Hook]:
        return self.by_event[event]


def _queues(queue: str | Iterable[str]) -> tuple[str, ...]:
    """A registration's ``queue=``: one name, or several (the first is the type's own)."""
    names = (queue,) if isinstance(queue, str) else tuple(queue)
    if not names:
        raise ValueError("queue must name at least one queue")
    for name in names:
        check_queue_name(name)
    return tuple(dict.fromkeys(names))


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0, not {value!r}")


class TaskRegistry:
    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}
        self._schedules: dict[str, Periodic] = {}
        self.hooks = Hooks()

    def register(
        self,
        name: str,
        payload_model: type[P],
        handler: Callable[[P, TaskContext], Any],
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        retry_base: float | None = None,
        retry_max: float | None = None,
        retry_jitter: float | None = None,
        queue: str | Iterable[str] = DEFAULT_QUEUE,
    ) -> TaskType:
        if name in self._types and self._types[name].handler is not handler:
            raise ValueError(f"task type {name!r} is already registered")
        _positive("timeout", timeout)
        _positive("retry_base", retry_base)
        _positive("retry_max", retry_max)
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, not {max_attempts!r}")
        if retry_jitter is not None and not 0 <= retry_jitter <= 1:
            raise ValueError(f"retry_jitter must be between 0 and 1, not {retry_jitter!r}")
        task_type = TaskType(
            name,
            payload_model,
            handler,
            timeout,
            max_attempts,
            retry_base,
            retry_max,
            _queues(queue),
            retry_jitter,
        )
        self._types[name] = task_type
        return task_type

    def task(
        self,
        name: str,
        payload_model: type[P],
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        retry_base: float | None = None,
        retry_max: float | None = None,
        retry_jitter: float | None = None,
        queue: str | Iterable[str] = DEFAULT_QUEUE,
        schedule: Timing | None = None,
        payload: dict[str, Any] | None = None,
        catch_up: CatchUp = "skip",
    ) -> Callable[[HandlerT], HandlerT]:
        """Register the decorated ``handler(payload, ctx)`` (``async def`` or plain
        ``def``) under ``name``, with its policy and its queue (or queues, the first
        its own). With ``schedule`` (``cron(...)`` or ``every(...)``), also a periodic
        task of that name creating a task with ``payload`` on every tick."""
        if schedule is not None:
            # Checked at import, where the mistake is, not when a scheduler first fires.
            payload_model.model_validate(payload or {})
        elif payload is not None:
            raise ValueError("payload= is the payload of a schedule: give schedule= too")

        def decorate(handler: HandlerT) -> HandlerT:
            self.register(
                name,
                payload_model,
                handler,
                timeout=timeout,
                max_attempts=max_attempts,
                retry_base=retry_base,
                retry_max=retry_max,
                retry_jitter=retry_jitter,
                queue=queue,
            )
            if schedule is not None:
                self.periodic(name, name, schedule, payload, catch_up=catch_up)
            return handler

        return decorate

    def periodic(
        self,
        name: str,
        task_type: str,
        schedule: Timing,
        payload: dict[str, Any] | None = None,
        *,
        priority: int = 0,
        queue: str | None = None,
        max_attempts: int | None = None,
        catch_up: CatchUp = "skip",
    ) -> Periodic:
        """Declare a schedule ``name`` creating a ``task_type`` task on every tick of
        ``schedule``. The type may be registered later (or by another registry); the
        relay checks the payload against it when it loads its task modules."""
        periodic = Periodic(
            name,
            task_type,
            schedule,
            dict(payload or {}),
            priority,
            queue,
            max_attempts,
            catch_up,
        )
        existing = self._schedules.get(name)
        if existing is not None and existing != periodic:
            raise ValueError(f"schedule {name!r} is already declared")
        self._schedules[name] = periodic
        return periodic

    def schedules(self) -> list[Periodic]:
        """The schedules declared in code on this registry, by name."""
        return [self._schedules[name] for name in sorted(self._schedules)]

    def on(self, event: HookEvent) -> Callable[[HookT], HookT]:
        """Register the decorated ``hook(event: AttemptEvent)`` for ``event``."""

        def decorate(hook: HookT) -> HookT:
            self.hooks.add(event, hook)
            return hook

        return decorate

    def get(self, name: str) -> TaskType | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __len__(self) -> int:
        return len(self._types)

    def include(self, other: TaskRegistry) -> None:
        """Add ``other``'s types and hooks to this registry (its hooks after ours). A
        name both register for different handlers is the same error as registering it
        twice."""
        for task_type in other._types.values():
            existing = self._types.get(task_type.name)
            if existing is not None and existing.handler is not task_type.handler:
                raise ValueError(f"task type {task_type.name!r} is already registered")
        for periodic in other._schedules.values():
            declared = self._schedules.get(periodic.name)
            if declared is not None and declared != periodic:
                raise ValueError(f"schedule {periodic.name!r} is already declared")
        self._types.update(other._types)
        self._schedules.update(other._schedules)
        for event, hooks in other.hooks.by_event.items():
            for hook in hooks:
                if hook not in self.hooks[event]:  # a registry included twice runs it once
                    self.hooks.add(event, hook)

    def without(self, names: Iterable[str]) -> TaskRegistry:
        """A new registry with every type of this one but ``names``, and its hooks."""
        excluded = set(names)
        return self._copy({n: t for n, t in self._types.items() if n not in excluded})

    def queues(self) -> list[str]:
        """Every queue some type is registered for."""
        return sorted({queue for t in self._types.values() for queue in t.queues})

    def _copy(self, types: dict[str, TaskType]) -> TaskRegistry:
        registry = TaskRegistry()
        registry._types = types
        # A schedule of a type left out would only fail: it goes with its type.
        registry._schedules = {n: p for n, p in self._schedules.items() if p.task_type in types}
        for event, hooks in self.hooks.by_event.items():
            for hook in hooks:
                registry.hooks.add(event, hook)
        return registry


default_registry = TaskRegistry()


def task(
    name: str,
    payload_model: type[P],
    *,
    timeout: float | None = None,
    max_attempts: int | None = None,
    retry_base: float | None = None,
    retry_max: float | None = None,
    retry_jitter: float | None = None,
    queue: str | Iterable[str] = DEFAULT_QUEUE,
    schedule: Timing | None = None,
    payload: dict[str, Any] | None = None,
    catch_up: CatchUp = "skip",
) -> Callable[[HandlerT], HandlerT]:
    """``default_registry.task(...)``: register the decorated handler under ``name``
    (and, with ``schedule``, a periodic task of that name)."""
    return default_registry.task(
        name,
        payload_model,
        timeout=timeout,
        max_attempts=max_attempts,
        retry_base=retry_base,
        retry_max=retry_max,
        retry_jitter=retry_jitter,
        queue=queue,
        schedule=schedule,
        payload=payload,
        catch_up=catch_up,
    )


def periodic(
    name: str,
    task_type: str,
    schedule: Timing,
    payload: dict[str, Any] | None = None,
    *,
    priority: int = 0,
    queue: str | None = None,
    max_attempts: int | None = None,
    catch_up: CatchUp = "skip",
) -> Periodic:
    """``default_registry.periodic(...)``: declare a schedule in code."""
    return default_registry.periodic(
        name,
        task_type,
        schedule,
        payload,
        priority=priority,
        queue=queue,
        max_attempts=max_attempts,
        catch_up=catch_up,
    )


def on(event: HookEvent) -> Callable[[HookT], HookT]:
    """``default_registry.on(event)``: register the decorated hook."""
    return default_registry.on(event)


def load_registry(modules: Iterable[str], *, builtin_types: bool = True) -> TaskRegistry:
    """Import the built-ins and every entry of ``modules`` (TASK_MODULES): a module,
    whose ``@task``/``@on`` decorators register in ``default_registry``, or
    ``module:attribute`` naming a ``TaskRegistry`` instance of the user's, whose types
    and hooks join the result. The result is ``default_registry`` when nothing else
    joins it.

    Without ``builtin_types`` (BUILTIN_TASK_TYPES=false) the result is a copy without
    the built-in demo types. They are still imported, so their names stay taken: a
    module cannot register an ``echo`` of its own either way.
    """
    builtins = importlib.import_module("taskbox.tasktypes.builtins")
    entries = list(modules)
    if entries:
        _put_working_directory_on_path()
    instances: dict[int, TaskRegistry] = {}  # one entry per registry, however often named
    for entry in entries:
        instance = _load_entry(entry)
        if instance is not None and instance is not default_registry:
            instances[id(instance)] = instance
    if not instances:
        return default_registry if builtin_types else default_registry.without(builtins.NAMES)
    # Built from default_registry, built-ins included, so that no registry can give a
    # built-in's name to a handler of its own; then the built-ins go if they must, even
    # those a registry brought along by including default_registry.
    combined = TaskRegistry()  # default_registry itself stays as the decorators left it
    combined.include(default_registry)
    for instance in instances.values():
        try:
            combined.include(instance)
        except ValueError as exc:
            raise RuntimeError(f"TASK_MODULES: {exc} (by two registries)") from None
    return combined if builtin_types else combined.without(builtins.NAMES)


def _load_entry(entry: str) -> TaskRegistry | None:
    """Import one TASK_MODULES entry; the ``TaskRegistry`` it names, if it names one."""
    module, _, attribute = entry.partition(":")
    try:
        imported = _import_task_module(module)
    except ImportError as exc:
        raise RuntimeError(
            f"TASK_MODULES names {module!r}, which cannot be imported: {exc}"
        ) from exc
    if not attribute:
        return None
    instance = getattr(imported, attribute, None)
    if not isinstance(instance, TaskRegistry):
        found = "nothing" if instance is None else f"a {type(instance).__name__}"
        raise RuntimeError(
            f"TASK_MODULES names {entry!r}, but {module}.{attribute} is {found}, not a "
            "taskbox.TaskRegistry (write 'module' for @task decorators, 'module:name' for "
            "a registry instance)"
        )
    return instance


def _put_working_directory_on_path() -> None:
    """The user's task modules live in the directory the process starts from, as with
    ``python -m``: the ``taskbox`` console script does not put it on ``sys.path`` itself
    (uvicorn and Celery's worker do the same). Taskbox's own modules are all under
    ``taskbox.``, so a user's ``api`` or ``db`` package found here shadows nothing."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _import_task_module(module: str) -> ModuleType:
    """Import one TASK_MODULES entry. If that import is what loaded the deprecated
    ``tasktypes`` alias, the module and the line to change are logged, where an
    operator sees them (its DeprecationWarning is hidden outside ``__main__``)."""
    already = "tasktypes" in sys.modules
    imported = importlib.import_module(module)
    alias = sys.modules.get("tasktypes")
    if not already and alias is not None:
        log.warning(
            "task module %s: %s (%s)",
            module,
            getattr(alias, "DEPRECATION", "'tasktypes' is deprecated"),
            getattr(alias, "IMPORTED_FROM", "unknown line"),
        )
    return imported
