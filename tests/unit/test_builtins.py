"""The built-in demo task types: the sleep cap, and BUILTIN_TASK_TYPES turning them off."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from taskbox.api.settings import ApiSettings
from taskbox.consumer.settings import ConsumerSettings
from taskbox.relay.settings import RelaySettings
from taskbox.tasktypes import default_registry, load_registry
from taskbox.tasktypes.builtins import MAX_SLEEP_SECONDS, NAMES, SleepPayload

SAMPLE_MODULE = "tests.unit.sample_task_module"


def test_sleep_is_capped_below_the_default_handler_timeout() -> None:
    # A longer sleep could only time out and be retried until its attempts ran out.
    default_timeout = ConsumerSettings.model_fields["handler_timeout"].default
    assert MAX_SLEEP_SECONDS == 60 < default_timeout
    assert SleepPayload.model_validate({"seconds": 60}).seconds == 60
    for seconds in (60.001, 300, 3600):
        with pytest.raises(ValidationError, match="less than or equal to 60"):
            SleepPayload.model_validate({"seconds": seconds})


def test_names_are_exactly_the_types_the_builtins_module_registers() -> None:
    load_registry([])
    types = [default_registry.get(name) for name in default_registry.names()]
    builtin = {
        t.name
        for t in types
        if t is not None and t.handler.__module__ == "taskbox.tasktypes.builtins"
    }
    assert builtin == set(NAMES) == {"echo", "sleep", "sha256", "fail"}


def test_builtin_task_types_are_on_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BUILTIN_TASK_TYPES", raising=False)
    assert ApiSettings(_env_file=None).builtin_task_types is True
    assert ConsumerSettings(_env_file=None).builtin_task_types is True
    monkeypatch.setenv("BUILTIN_TASK_TYPES", "false")
    assert ApiSettings(_env_file=None).builtin_task_types is False
    assert ConsumerSettings(_env_file=None).builtin_task_types is False
    # The relay runs no handler, but its scheduler reads the schedules the task modules
    # declare and checks their payloads, as the api would.
    assert RelaySettings(_env_file=None).builtin_task_types is False
    assert "task_modules" in RelaySettings.model_fields


def test_with_builtins_the_registry_has_them_and_the_user_modules_types() -> None:
    registry = load_registry([SAMPLE_MODULE], builtin_types=True)
    assert set(NAMES) | {"sample-greet"} <= set(registry.names())


def test_without_builtins_the_registry_keeps_only_the_user_modules_types() -> None:
    registry = load_registry([SAMPLE_MODULE], builtin_types=False)
    assert "sample-greet" in registry
    for name in NAMES:
        assert name not in registry
        assert registry.get(name) is None
    # Turning them off in one registry leaves the process-wide one as it was.
    assert set(NAMES) <= set(load_registry([]).names())
