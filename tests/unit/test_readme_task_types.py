"""The README's "Task types" examples run: its handler module and the pytest file a user
would write for it, each taken from the README as written (its first line names its
path), run by pytest in a fresh interpreter so their registrations stay out of this one.

``requests`` and ``sentry_sdk`` are stand-ins: the example's tests replace
``requests.get``, and no network or Sentry account is needed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests import readme

# (the heading each block sits under, the path its first line names); the README's
# quick start has a myapp/tasks.py of its own, run by tests/integration/test_readme_examples.py
EXAMPLES = (("Adding your own", "myapp/tasks.py"), ("Testing your handlers", "tests/test_tasks.py"))
STAND_INS = {
    "requests.py": (
        "def get(url, timeout):\n"
        "    raise AssertionError('the example tests replace requests.get')\n"
    ),
    "sentry_sdk.py": "def capture_exception(error):\n    pass\n",
}


def test_the_task_types_examples_pass_as_a_users_pytest_run(tmp_path: Path) -> None:
    for heading, path in EXAMPLES:
        block = readme.block(heading, f"# {path}")
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(block.text)
    for name, code in STAND_INS.items():
        (tmp_path / name).write_text(code)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # the user's project, not ours
    # No plugins: the example needs none, and ours (schemathesis) import the real requests.
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_tasks.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"\b4 passed\b", run.stdout), run.stdout
