"""The ``taskbox`` import root as handler authors use it: the handler API re-exported
without loading the server for a program that only imports the client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import taskbox
import taskbox.tasktypes as tasktypes

SERVER = ("api", "db", "relay", "consumer", "broker", "runtime", "tasktypes")
PREFIXES = [("taskbox", name) for name in SERVER]


def test_the_handler_api_is_tasktypes_own_objects() -> None:
    from taskbox import PermanentError, Retry, TaskContext, task

    assert task is tasktypes.task
    assert TaskContext is tasktypes.TaskContext
    assert PermanentError is tasktypes.PermanentError
    assert Retry is tasktypes.Retry


@pytest.mark.parametrize("name", taskbox.__all__)
def test_every_exported_name_is_the_tasktypes_one(name: str) -> None:
    assert getattr(taskbox, name) is getattr(tasktypes, name)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'load_registry'"):
        _ = taskbox.load_registry  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        from taskbox import nothing_here  # type: ignore[attr-defined]  # noqa: F401


def _loaded_after(code: str) -> list[str]:
    """The server modules a fresh interpreter has loaded after running ``code``."""
    probe = (
        f"import json, sys; {code}; "
        f"loaded = [m for m in sys.modules if tuple(m.split('.')[:2]) in {PREFIXES!r}]; "
        "print(json.dumps(sorted(loaded)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def test_importing_taskbox_or_its_client_loads_no_server_package() -> None:
    assert _loaded_after("import taskbox") == []
    assert _loaded_after("import taskbox.client") == []
    assert _loaded_after("from taskbox.client import Client") == []


def test_the_handler_api_loads_tasktypes_on_first_use() -> None:
    assert "taskbox.tasktypes.registry" in _loaded_after("from taskbox import task")


def test_the_old_tasktypes_name_warns_and_is_the_same_handler_api(tmp_path: Path) -> None:
    # A handler module of the previous release, imported fresh by a new interpreter.
    (tmp_path / "old_handlers.py").write_text(
        "from tasktypes import task\nimport tasktypes.registry\nimport tasktypes.builtins\n"
    )
    probe = (
        "import warnings, json\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import old_handlers\n"
        "import taskbox, taskbox.tasktypes.registry, taskbox.tasktypes.builtins, tasktypes\n"
        "print(json.dumps({\n"
        "    'warnings': [[w.category.__name__, str(w.message), w.filename, w.lineno]\n"
        "                 for w in caught],\n"
        "    'same_task': old_handlers.task is taskbox.task,\n"
        "    'same_registry': tasktypes.registry is taskbox.tasktypes.registry,\n"
        "    'same_builtins': tasktypes.builtins is taskbox.tasktypes.builtins,\n"
        "}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout)
    assert seen["same_task"] and seen["same_registry"] and seen["same_builtins"], seen
    ((category, message, filename, line),) = seen["warnings"]
    assert category == "DeprecationWarning"
    assert "from taskbox import task" in message
    # attributed to the user's import line, not to importlib
    assert (Path(filename).name, line) == ("old_handlers.py", 1)
