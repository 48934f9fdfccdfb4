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

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("myapp/tasks.py", "tests/test_tasks.py")
STAND_INS = {
    "requests.py": (
        "def get(url, timeout):\n"
        "    raise AssertionError('the example tests replace requests.get')\n"
    ),
    "sentry_sdk.py": "def capture_exception(error):\n    pass\n",
}


def readme_python_blocks() -> dict[str, str]:
    """The README's python blocks that start with a ``# path`` comment, by that path."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)
    return {m.group(1): b for b in blocks if (m := re.match(r"# (\S+\.py)\n", b))}


def test_the_task_types_examples_pass_as_a_users_pytest_run(tmp_path: Path) -> None:
    blocks = readme_python_blocks()
    for path in EXAMPLES:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(blocks[path])
    (tmp_path / "myapp" / "__init__.py").write_text("")
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
