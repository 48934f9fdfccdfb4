"""TASK_MODULES entries naming a registry instance (``module:attribute``): its types and
hooks join the processes' registry, and the global one is left alone."""

from __future__ import annotations

import pytest

from taskbox.tasktypes import TaskRegistry, default_registry, load_registry
from taskbox.testing import run_sync
from tests.unit import sample_registry_module

ENTRY = "tests.unit.sample_registry_module:app"


def test_an_instance_joins_with_its_types_and_hooks() -> None:
    registry = load_registry([ENTRY])
    shout = registry.get("sample-shout")
    assert shout is not None and shout.max_attempts == 4
    assert "echo" in registry  # the built-ins are still there
    assert sample_registry_module.remember in registry.hooks["success"]
    # the instance was read, not registered on the global registry
    assert "sample-shout" not in default_registry
    assert sample_registry_module.remember not in default_registry.hooks["success"]

    sample_registry_module.seen.clear()
    outcome = run_sync("sample-shout", {"text": "hi"}, registry=registry)
    assert (outcome.status, outcome.result) == ("DONE", {"shout": "HI"})
    assert sample_registry_module.seen == ["sample-shout"]


def test_without_builtins_the_instance_still_joins() -> None:
    registry = load_registry([ENTRY], builtin_types=False)
    assert "sample-shout" in registry and "echo" not in registry


def test_a_name_that_is_not_a_registry_says_what_to_write() -> None:
    with pytest.raises(RuntimeError, match=r"not_a_registry is a str, not a taskbox.TaskRegistry"):
        load_registry(["tests.unit.sample_registry_module:not_a_registry"])
    with pytest.raises(RuntimeError, match=r"sample_registry_module.missing is nothing"):
        load_registry(["tests.unit.sample_registry_module:missing"])


def test_two_registries_with_one_name_for_different_handlers_are_refused() -> None:
    other = TaskRegistry()
    handler = sample_registry_module.shout
    other.register("sample-shout", sample_registry_module.Shout, handler)
    combined = TaskRegistry()
    combined.include(sample_registry_module.app)
    combined.include(other)  # the same handler: no conflict
    clash = TaskRegistry()
    clash.register("sample-shout", sample_registry_module.Shout, lambda payload, ctx: None)
    with pytest.raises(ValueError, match="'sample-shout' is already registered"):
        combined.include(clash)


def test_a_registry_named_twice_or_included_twice_runs_each_hook_once() -> None:
    registry = load_registry([ENTRY, ENTRY, "tests.unit.sample_registry_module:alias"])
    assert registry.hooks["success"].count(sample_registry_module.remember) == 1
    twice = TaskRegistry()
    twice.include(sample_registry_module.app)
    twice.include(sample_registry_module.app)
    assert twice.hooks["success"].count(sample_registry_module.remember) == 1


def test_builtins_off_holds_for_a_registry_that_brought_them_along(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    load_registry([])  # the built-ins are on default_registry
    greedy = TaskRegistry()
    greedy.include(default_registry)  # echo, sleep, sha256, fail come along
    monkeypatch.setattr(sample_registry_module, "greedy", greedy, raising=False)
    registry = load_registry(["tests.unit.sample_registry_module:greedy"], builtin_types=False)
    assert not {"echo", "sleep", "sha256", "fail"} & set(registry.names())


def test_a_registry_cannot_take_a_builtins_name_even_with_builtins_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    impostor = TaskRegistry()
    impostor.register("echo", sample_registry_module.Shout, sample_registry_module.shout)
    monkeypatch.setattr(sample_registry_module, "impostor", impostor, raising=False)
    with pytest.raises(RuntimeError, match="'echo' is already registered"):
        load_registry(["tests.unit.sample_registry_module:impostor"], builtin_types=False)


def test_a_copy_without_builtins_shares_no_hook_list_with_the_original() -> None:
    copy = default_registry.without(["echo"])
    assert copy.hooks["failure"] is not default_registry.hooks["failure"]
