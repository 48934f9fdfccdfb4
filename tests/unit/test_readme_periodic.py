"""README's "Periodic tasks" module, run as a user's task module: it declares the two
schedules it says, which the relay's scheduler accepts as they are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests import readme

PROBE = """
import json
from taskbox.tasktypes import load_registry
from taskbox.relay.scheduler import declared_schedules

registry = load_registry(["myapp.reports"])
print(json.dumps([
    [d.name, d.task_type, d.cron, d.interval_seconds, d.timezone, d.payload, d.catch_up]
    for d in declared_schedules(registry, 3)
]))
"""


def test_the_periodic_tasks_example_declares_its_two_schedules(tmp_path: Path) -> None:
    block = readme.block("Periodic tasks", "# myapp/reports.py")
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "reports.py").write_text(block.text)
    ran = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == [
        ["report", "report", "0 6 * * 1-5", None, "Europe/Berlin", {"kind": "daily"}, "skip"],
        ["report-often", "report", None, 600.0, "UTC", {"kind": "short"}, "all"],
    ]
