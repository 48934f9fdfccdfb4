"""Taskbox run from a user's own repository, the most common layout: the project has its
own top-level ``api``, ``db``, ``runtime`` and ``broker`` packages, and its handlers
import them. Taskbox's processes (the installed ``taskbox`` command, started from the
project's directory with ``TASK_MODULES`` naming the project's handler modules) must
run those handlers without either side's packages shadowing the other's.

Each of the project's packages holds only a marker, so a Taskbox module resolved from
the project instead of from ``taskbox.*`` fails to import (``db.states`` does not exist
there) and the process dies before its ready line.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.integration.processes import ServiceProcess, free_port

TASKBOX = str(Path(sys.executable).parent / "taskbox")
SHADOWING_PACKAGES = ("api", "db", "runtime", "broker")

HANDLERS = '''
    """The project's handlers: built on taskbox and on the project's own packages."""

    from pydantic import BaseModel

    import api
    import broker
    import db
    import runtime
    from taskbox import TaskContext, task


    class Greeting(BaseModel):
        name: str


    @task("project-greet", Greeting)
    async def greet(payload: Greeting, ctx: TaskContext) -> dict[str, str]:
        return {
            "greeting": f"hello {payload.name}",
            "packages": " ".join([api.OWNER, db.OWNER, runtime.OWNER, broker.OWNER]),
        }
'''

# A handler module written before the taskbox package: it must keep working for a
# release, and the consumer says which module to change.
LEGACY_HANDLERS = """
    from pydantic import BaseModel

    from tasktypes import TaskContext, task


    class Nothing(BaseModel):
        pass


    @task("project-legacy", Nothing)
    def legacy(payload: Nothing, ctx: TaskContext) -> dict[str, str]:
        return {"legacy": "still runs"}
"""


def write_project(root: Path) -> None:
    for package in SHADOWING_PACKAGES:
        (root / package).mkdir()
        (root / package / "__init__.py").write_text(f'OWNER = "project {package}"\n')
    # ``python -m api`` in this directory is the project's own api, not Taskbox's
    (root / "api" / "__main__.py").write_text('raise SystemExit("the project\'s own api")\n')
    (root / "handlers.py").write_text(textwrap.dedent(HANDLERS))
    (root / "legacy_handlers.py").write_text(textwrap.dedent(LEGACY_HANDLERS))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_project(tmp_path)
    return tmp_path


@pytest.fixture
async def processes() -> AsyncIterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for process in reversed(started):
        process.kill()
        await process.wait()


async def wait_finished(client: httpx.AsyncClient, task_id: str) -> dict[str, object]:
    for _ in range(300):
        task: dict[str, object] = (await client.get(f"/api/v1/tasks/{task_id}")).json()
        if task["status"] in {"DONE", "FAILED", "CANCELLED"}:
            return task
        await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} did not finish: {task}")


async def test_a_project_with_its_own_api_and_db_packages_runs_its_handlers(
    project: Path, service_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    port = free_port()
    env = {**service_env, "TASK_MODULES": "handlers,legacy_handlers", "API_PORT": str(port)}
    for name in ("api", "relay", "consumer"):
        process = ServiceProcess(name, env, argv=[TASKBOX, name])
        process.cwd = project
        processes.append(process)
        await process.start()

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        created = await client.post(
            "/api/v1/tasks", json={"type": "project-greet", "payload": {"name": "ada"}}
        )
        assert created.status_code == 201, created.text
        legacy = await client.post("/api/v1/tasks", json={"type": "project-legacy", "payload": {}})
        assert legacy.status_code == 201, legacy.text

        done = await wait_finished(client, created.json()["id"])
        assert done["status"] == "DONE", done
        assert done["result"] == {
            "greeting": "hello ada",
            "packages": "project api project db project runtime project broker",
        }
        legacy_done = await wait_finished(client, legacy.json()["id"])
        assert legacy_done["status"] == "DONE", legacy_done
        assert legacy_done["result"] == {"legacy": "still runs"}

    consumer = processes[2]
    (warning,) = [line for line in consumer.lines if "'tasktypes' package is deprecated" in line]
    assert "legacy_handlers" in warning, warning
    assert "legacy_handlers.py" in warning, warning  # the file and line to change
