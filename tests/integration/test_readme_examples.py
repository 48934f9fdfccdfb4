"""Every example of README.md runs as written, or says here why it does not.

``INVENTORY`` lists every fenced block of the README by its heading and the start of its
first line: either the test of this file that runs it, or where it is covered instead
(and why it is not run here). ``COMMAND_TABLE`` does the same for the ``example`` column
of the Commands table. ``test_every_readme_example_is_run_or_accounted_for`` fails on a
block or example in neither, and on an entry whose block is gone.

The examples run against real processes started here (``taskbox api``, ``relay``,
``consumer`` and the operator commands, from ``.venv/bin``), on this test's own
database and queues. ``curl`` runs as written through ``bash``, with a ``.curlrc``
(``CURL_HOME``) that only appends the status code to its output, so each command's
status can be held to the one its comment states (``# 201 Created``, ``# HTTP/1.1 404``,
``# 413 ...``; no comment: a 2xx). What an example cannot know is substituted, each
substitution named beside the test that makes it, and every substituted text must still
be in the example (a changed README fails here instead of being silently skipped):

- ``localhost:8000`` (and 9101/9102, 8080) -> the port of the process this test started;
- placeholders: ``<id>``, ``<next_cursor>``, the example task id ``0b6f5a8e-...``,
  ``KEY=...`` and ``api_key="..."`` -> values of this run;
- a database URL or host of the README's own setup -> this test's database, and in the
  output samples its database and queue names and the operator's user@host;
- the quick start's ``pip install`` line is left out (this venv has Taskbox installed),
  and ``make dev`` runs as ``make -o .venv/.installed dev`` (a test never reinstalls the
  venv it runs in).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from taskbox.api.settings import ApiSettings
from taskbox.broker.settings import BrokerSettings
from taskbox.consumer.settings import ConsumerSettings
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, create_task
from taskbox.relay.settings import RelaySettings
from taskbox.webhooks import new_secret, sign
from tests import readme
from tests.conftest import ADMIN_DSN, database_dsn
from tests.integration.helpers_broker import topology
from tests.integration.processes import (
    READY,
    ROOT,
    CommandResult,
    ServiceProcess,
    free_port,
    run_argv,
)

VENV_BIN = Path(sys.executable).parent
TASKBOX = str(VENV_BIN / "taskbox")
API_KEY = "readme-example-key"
EXAMPLE_TASK_ID = "0b6f5a8e-3c1d-4a51-9d7e-2f1c9b0e7a11"


@dataclass(frozen=True)
class Entry:
    """A README block: ``heading`` and how its first line starts; ``run_by`` names the
    test of this file that runs it, ``elsewhere`` where it is covered or why it is not run
    (both: the block is partly run here, and ``elsewhere`` says where the rest is)."""

    heading: str
    starts: str
    run_by: str = ""
    elsewhere: str = ""


QUICK = "Your own tasks, from your own project"
QUEUES = "Queues: routing tasks to consumer pools"
PAUSING = "Pausing and resuming a queue"
PERIODIC = "Periodic tasks"
WEBHOOKS = "Webhooks"
BULK = "Bulk actions: `POST /api/v1/tasks/cancel`, `POST /api/v1/tasks/retry`"
INVENTORY = [
    Entry("Taskbox", "client --REST--> api", elsewhere="a diagram"),
    Entry(
        "Quick start",
        "make dev",
        run_by="test_make_dev_runs_the_three_processes_until_ctrl_c",
        elsewhere="`make test` is CI's own",
    ),
    Entry("Quick start", "curl -i localhost:8000", run_by="test_quick_start_from_your_own_project"),
    Entry(QUICK, "# myapp/tasks.py", run_by="test_quick_start_from_your_own_project"),
    Entry(QUICK, "pip install", run_by="test_quick_start_from_your_own_project"),
    Entry(
        QUICK, "from taskbox.client import Client", run_by="test_quick_start_from_your_own_project"
    ),
    Entry("Request ids: `X-Request-ID`", "curl -i -H 'X-Request-ID", run_by="test_api_examples"),
    Entry("Request ids: `X-Request-ID`", "curl -i localhost:8000", run_by="test_api_examples"),
    Entry("Authentication and limits", "export KEY=", run_by="test_api_examples"),
    Entry("Authentication and limits", "head -c 2000000", run_by="test_api_examples"),
    Entry("Create a task: `POST /api/v1/tasks`", "curl -i", run_by="test_api_examples"),
    Entry("Scheduled tasks: `run_at` and `delay_seconds`", "curl", run_by="test_api_examples"),
    Entry("Idempotency-Key: safe retries", "curl -i", run_by="test_api_examples"),
    Entry("Create many tasks: `POST /api/v1/tasks/batch`", "curl", run_by="test_api_examples"),
    Entry("List tasks: `GET /api/v1/tasks`", "curl", run_by="test_api_examples"),
    Entry("Get a task: `GET /api/v1/tasks/{id}`", "curl", run_by="test_api_examples"),
    Entry(
        "Get just the status: `GET /api/v1/tasks/{id}/status`", "curl", run_by="test_api_examples"
    ),
    Entry("Waiting for a result", 'curl "localhost', run_by="test_api_examples"),
    Entry("Waiting for a result", "curl -N localhost", run_by="test_api_examples"),
    Entry(
        "Waiting for a result",
        'curl -N "localhost',
        elsewhere="tests/integration/test_task_event_streams.py::test_streams_follow_tasks_run_"
        "by_a_real_relay_and_consumer (the stream stays open for TASK_EVENTS_MAX_STREAM)",
    ),
    Entry("Cancel a task: `DELETE /api/v1/tasks/{id}`", "curl", run_by="test_api_examples"),
    Entry(
        BULK,
        "curl -s -H",
        elsewhere="output samples; tests/integration/test_bulk_actions.py::"
        "test_cancel_by_filter_over_the_api_with_a_dry_run_first sends such bodies (dry run, "
        "cancel, then the action and the listing) with a named key, and "
        "test_retry_is_the_replay_and_the_cli_and_api_agree the retry",
    ),
    Entry(BULK, "taskbox tasks cancel", run_by="test_task_commands"),
    Entry("Health: `GET /healthz`, `GET /readyz`", "curl", run_by="test_api_examples"),
    Entry("Tracing: the `traceparent` header", "curl", run_by="test_api_examples"),
    Entry(
        "OpenTelemetry",
        "# a collector",
        elsewhere="tests/integration/test_otel.py::test_spans_from_api_relay_and_consumer_share_the_"
        "callers_trace runs the three processes with OTEL_EXPORTER_OTLP_ENDPOINT set to a local "
        "OTLP receiver and this traceparent; otel-collector is the reader's own host",
    ),
    Entry("Python client", "from taskbox.client import", run_by="test_api_examples"),
    Entry(
        "Replay: send tasks again",
        "$ taskbox replay --stale-for 10m --dry-run",
        run_by="test_operator_commands",
    ),
    Entry(
        "Replay: send tasks again",
        "$ taskbox replay --stale-for 10m --reason",
        run_by="test_operator_commands",
    ),
    Entry("Retention", "$ taskbox cleanup", run_by="test_operator_commands"),
    Entry("Status: one screen", "$ taskbox status", run_by="test_operator_commands"),
    Entry(
        "Status: one screen",
        "schedules     2, led by",
        elsewhere="an output sample; tests/integration/test_status.py::"
        "test_status_lists_schedules_with_their_next_fire_time_and_who_leads prints it",
    ),
    Entry(
        "Metrics and health",
        "$ curl -s localhost:9101",
        run_by="test_quick_start_from_your_own_project",
    ),
    Entry(
        "Metrics and health",
        "# prometheus.yml",
        run_by="test_prometheus_config_scrapes_each_compose_service_at_its_port",
        elsewhere="a Prometheus configuration, checked against docker-compose.yml and the "
        "processes' default ports, not run: no Prometheus here",
    ),
    Entry("Logs", "2026-11-26", run_by="test_quick_start_from_your_own_project"),
    Entry(
        "Database roles (least privilege)",
        "$ DATABASE_URL=postgresql://postgres@db.internal",
        elsewhere="creates the cluster-wide roles taskbox_api, taskbox_relay, taskbox_consumer, "
        "shared by every database of the server: tests/integration/test_roles.py::"
        "test_the_command_creates_then_updates_and_sets_passwords runs the same command with "
        "role names of its own and checks its report; `taskbox roles --dry-run` runs here",
    ),
    Entry(
        "Adding your own",
        "# myapp/tasks.py",
        elsewhere="tests/unit/test_readme_task_types.py::"
        "test_the_task_types_examples_pass_as_a_users_pytest_run (the module under its tests)",
    ),
    Entry(
        "Testing your handlers",
        "# tests/test_tasks.py",
        elsewhere="tests/unit/test_readme_task_types.py::"
        "test_the_task_types_examples_pass_as_a_users_pytest_run (pytest in a user's project)",
    ),
    Entry(
        QUEUES,
        "# myapp/media.py",
        elsewhere="types on named queues as tests/integration/queue_tasks.py registers them "
        "(queue='media', queue=('media', 'bulk')), run by tests/integration/test_queues.py::"
        "test_each_type_runs_only_in_the_consumer_pool_of_its_queue; the module itself is "
        "not run (a sketch without handler bodies)",
    ),
    Entry(
        QUEUES,
        "CONSUMER_QUEUES=media:4",
        elsewhere="two pools started so by tests/integration/test_queues.py::"
        "test_each_type_runs_only_in_the_consumer_pool_of_its_queue (with the test's own "
        "task module)",
    ),
    Entry(
        QUEUES,
        "curl -s localhost:8000/api/v1/queues",
        elsewhere="an output sample; tests/integration/test_queues.py::"
        "test_a_queue_with_work_and_no_consumer_is_visible_and_holds_its_tasks reads "
        "GET /api/v1/queues in that situation",
    ),
    Entry(
        PAUSING,
        "curl -s -H",
        elsewhere="output samples; tests/integration/test_queue_pause.py::"
        "test_a_paused_queue_holds_its_tasks_while_the_others_flow_and_resume_drains_it "
        "pauses, shows and resumes a queue over the API with named keys",
    ),
    Entry(PAUSING, "taskbox queues", run_by="test_queue_commands"),
    Entry(
        PERIODIC,
        "# myapp/reports.py",
        elsewhere="tests/unit/test_readme_periodic.py::"
        "test_the_periodic_tasks_example_declares_its_two_schedules (run as a user's module)",
    ),
    Entry(
        PERIODIC,
        "curl -s -X POST localhost:8000/api/v1/schedules",
        run_by="test_api_examples",
    ),
    Entry(
        WEBHOOKS,
        "curl -s -X POST localhost:8000/api/v1/webhooks",
        run_by="test_webhook_examples",
    ),
    Entry(
        WEBHOOKS,
        "from standardwebhooks import",
        run_by="test_the_webhook_receiver_example_verifies_deliveries",
    ),
    Entry("Fault suite", "chaos:", elsewhere="an output sample of tests/faults/test_chaos.py"),
    Entry(
        "Postgres failover",
        "DATABASE_URL=postgresql://taskbox@db1:5432,db2:5432/",
        elsewhere="a setting; tests/faults/test_postgres_failover.py runs every process on it",
    ),
    Entry(
        "Postgres failover",
        "postgres failover:",
        elsewhere="an output sample of tests/faults/test_postgres_failover.py",
    ),
    Entry(
        "Fault suite",
        "leader kill:",
        elsewhere="an output sample of tests/cluster/test_rabbit_faults.py (make test-cluster)",
    ),
    Entry(
        "Running on a RabbitMQ cluster",
        "AMQP_URL=amqp://taskbox:PASS@rabbit1",
        elsewhere="settings for a cluster elsewhere; tests/cluster/test_rabbit_faults.py runs "
        "the processes with such a list (its own cluster's nodes) and QUEUE_TYPE=quorum, "
        "tests/unit/test_amqp_nodes.py parses it",
    ),
    Entry(
        "Run with Docker",
        "cp .env.example .env",
        elsewhere="needs a Docker engine; tests/integration/test_containers.py checks the "
        "compose file and runs the containers' commands as local processes",
    ),
    Entry(
        "Development",
        "make lint",
        elsewhere="the make targets CI runs (make lint, make test, make fuzz, make bench-quick)",
    ),
    Entry("Fuzzing the API", "fuzz summary:", elsewhere="an output sample of make fuzz"),
]

# The Commands table's ``example`` column: each is run by the test named.
COMMAND_TABLE = {
    "API_PORT=8080 taskbox api": "test_api_examples",
    "RELAY_METRICS_PORT=0 taskbox relay": "test_api_examples",
    "CONSUMER_CONCURRENCY=20 taskbox consumer": "test_api_examples",
    "DATABASE_URL=postgresql://postgres@127.0.0.1/taskbox taskbox migrate": (
        "test_operator_commands"
    ),
    "taskbox replay --stale-for 10m --dry-run": "test_operator_commands",
    "taskbox status --json": "test_operator_commands",
    "TASK_RETENTION=30d taskbox cleanup": "test_operator_commands",
    "taskbox roles --dry-run": "test_operator_commands",
    'taskbox queues pause media --reason "INC-1234"': "test_queue_commands",
    "taskbox schedules list": "test_operator_commands",
    'taskbox tasks cancel --type resize --reason "INC-1234" --dry-run': "test_task_commands",
}

MISSING = """README.md {what} is neither run nor accounted for:
{detail}
Run it from a test in tests/integration/test_readme_examples.py and add an entry with
run_by= to INVENTORY (COMMAND_TABLE for the Commands table), or, when it cannot run
(an output sample, a Docker engine, a configuration file), an entry with elsewhere=
naming the test that covers it or why it is not run."""


def entry_of(block: readme.Block) -> list[Entry]:
    return [
        e for e in INVENTORY if e.heading == block.heading and block.first_line.startswith(e.starts)
    ]


def example(heading: str, starts: str) -> readme.Block:
    """The block of an INVENTORY entry that a test of this file runs."""
    (found,) = [
        b for b in readme.blocks() if b.heading == heading and b.first_line.startswith(starts)
    ]
    (entry,) = entry_of(found)
    assert entry.run_by, f"{entry} is listed as not run here"
    return found


def test_every_readme_example_is_run_or_accounted_for() -> None:
    blocks = readme.blocks()
    for block in blocks:
        entries = entry_of(block)
        detail = f"line {block.line}, under {block.heading!r}: ```{block.language}\n{block.text}"
        assert entries, MISSING.format(what="block", detail=detail)
        assert len(entries) == 1, f"several INVENTORY entries match the block at {detail}"
    for entry in INVENTORY:
        assert any(entry in entry_of(b) for b in blocks), (
            f"{entry} matches no README.md block: update or remove the entry"
        )
        assert entry.run_by or entry.elsewhere, entry  # both: partly run here
        if entry.run_by:
            assert entry.run_by in globals(), f"{entry}: no test {entry.run_by} in this file"
        for path, name in re.findall(r"(tests/\S+\.py)::(\w+)", entry.elsewhere):
            assert f"def {name}(" in (ROOT / path).read_text(), f"{entry}: {path} has no {name}"

    examples = readme.command_table_examples()
    for command in examples:
        assert command in COMMAND_TABLE, MISSING.format(
            what="Commands table example", detail=command
        )
    assert set(COMMAND_TABLE) <= set(examples), "COMMAND_TABLE names examples the table lost"
    assert all(test in globals() for test in COMMAND_TABLE.values())


def test_prometheus_config_scrapes_each_compose_service_at_its_port() -> None:
    config = yaml.safe_load(example("Metrics and health", "# prometheus.yml").text)
    (job,) = config["scrape_configs"]
    (targets,) = [static["targets"] for static in job["static_configs"]]
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    consumer_port = ConsumerSettings.model_fields["consumer_metrics_port"].default
    ports = {
        "api": ApiSettings.model_fields["api_port"].default,
        "relay": RelaySettings.model_fields["relay_metrics_port"].default,
        "consumer": consumer_port,
        "consumer-media": consumer_port,  # the second pool, each in its own container
    }
    assert targets == [f"{name}:{port}" for name, port in ports.items()]
    assert set(ports) <= set(services)


# -- running examples -----------------------------------------------------------------


def substituted(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each key replaced; every key must be there (else the README changed)."""
    for old, new in replacements.items():
        assert old in text, f"the README example no longer holds {old!r}:\n{text}"
        text = text.replace(old, new)
    return text


@pytest.fixture
def shell_env(service_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The test's settings, ``.venv/bin`` first on PATH, and a ``.curlrc`` that appends
    ``@@status=<code>`` to what curl prints."""
    curl_home = tmp_path / "curl-home"
    curl_home.mkdir()
    (curl_home / ".curlrc").write_text(
        'silent\nshow-error\nmax-time = 20\nwrite-out = "\\n@@status=%{http_code}\\n"\n'
    )
    return {
        **service_env,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "CURL_HOME": str(curl_home),
    }


async def sh(
    script: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 60.0
) -> CommandResult:
    return await run_argv(["bash", "-c", script], env, cwd=cwd, timeout=timeout)


async def curl(
    command: readme.Command,
    env: dict[str, str],
    replacements: dict[str, str],
    prefix: str = "",
    status: int | None = None,
) -> str:
    """Run one curl command of a README block; its status must be ``status``, else the
    one its comment states (a 2xx without either). Returns what curl printed."""
    script = prefix + substituted(command.text, replacements)
    result = await sh(script, env)
    statuses = re.findall(r"@@status=(\d{3})", result.stdout)
    assert len(statuses) == 1, f"{script}\n{result}"
    expected = status or command.expected_status
    status = int(statuses[0])
    if expected is None:
        assert 200 <= status < 300, f"{script}\n{result}"
    else:
        assert status == expected, f"{script}\nwanted {expected}\n{result}"
    return result.stdout.rsplit("\n@@status=", 1)[0]


def body(output: str) -> Any:
    """The JSON body of curl's output (after the head when it ran with -i)."""
    return json.loads(output.rsplit("\r\n\r\n", 1)[-1])


def same_shape(sample: Any, actual: Any) -> bool:
    """JSON of the same keys and strings (numbers may differ)."""
    if isinstance(sample, dict):
        return (
            isinstance(actual, dict)
            and sample.keys() == actual.keys()
            and all(same_shape(sample[k], actual[k]) for k in sample)
        )
    if isinstance(sample, (int, float)):
        return isinstance(actual, (int, float))
    return bool(sample == actual)


def sample_json(notes: list[str]) -> Any:
    """The JSON object a block's comment lines show (``# {...`` and the ``#  ...`` lines
    continuing it)."""
    lines = [note.lstrip("#").strip() for note in notes]
    start = next(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.loads("".join(lines[start:]))


def like(sample: Any, actual: Any) -> bool:
    """``actual`` as a README sample shows it: the same keys, the same values, but where
    the sample abbreviates (``"0b6f..."``: the rest differs) or shows a made-up request
    id (32 hex digits: any such id)."""
    if isinstance(sample, dict):
        return (
            isinstance(actual, dict)
            and sample.keys() == actual.keys()
            and all(like(sample[k], actual[k]) for k in sample)
        )
    if isinstance(sample, str) and isinstance(actual, str) and "..." in sample:
        return re.fullmatch(".*".join(map(re.escape, sample.split("..."))), actual) is not None
    if isinstance(sample, str) and re.fullmatch(r"[0-9a-f]{32}", sample):
        return isinstance(actual, str) and re.fullmatch(r"[0-9a-f]{32}", actual) is not None
    return bool(sample == actual)


class ProcessGroup(ServiceProcess):
    """A shell running a README block that starts processes in the background: a process
    group of its own, so that stopping it stops every process the block started."""

    async def launch(self) -> ProcessGroup:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())
        return self

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):  # every process of it is gone
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def stop_all(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            await self.wait(timeout=30)
        finally:
            self.kill()


async def wait_healthy(port: int) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                if (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing healthy on port {port}")


# -- Quick start ----------------------------------------------------------------------


async def test_make_dev_runs_the_three_processes_until_ctrl_c(shell_env: dict[str, str]) -> None:
    """``make dev``: migrate, then api, relay and consumer with prefixed logs, all stopped
    by Ctrl-C (SIGINT to the terminal's process group). Substituted: ``-o .venv/.installed``,
    so that a test never reinstalls the venv it runs in."""
    make_dev = readme.shell_commands(example("Quick start", "make dev").text)[0]
    port = free_port()
    command = substituted(make_dev.text, {"make dev": "make -o .venv/.installed dev"})
    dev = ProcessGroup("api", {**shell_env, "API_PORT": str(port)}, argv=["bash", "-c", command])
    await dev.launch()
    assert dev.proc is not None
    try:
        for name, ready in READY.items():
            await dev.wait_for(f"{name:<8}| ", timeout=30)
            await dev.wait_for(ready, timeout=30)
        await wait_healthy(port)
    finally:
        # Ctrl-C even when the test failed: make dev's three processes have sessions of
        # their own, so only make dev itself can stop them
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            os.killpg(dev.proc.pid, signal.SIGINT)
        try:
            await dev.wait(timeout=30)
        finally:
            dev.kill()
    # each of the three stopped gracefully (their last lines), and the api's port is closed
    for stopped in ("relay stopped;", "consumer stopped;", "Application shutdown complete"):
        assert stopped in dev.output, dev.output
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.TransportError):
            await client.get(f"http://127.0.0.1:{port}/healthz")


async def test_quick_start_from_your_own_project(tmp_path: Path, shell_env: dict[str, str]) -> None:
    """The user's project of "Your own tasks": its handler module where its first line
    says, the processes started by the shell block from the project's directory, then
    the client; the Quick start's curl commands and the metrics ports' probes on that
    stack. Substituted: the pip line (this venv has Taskbox installed), port 8000 and the
    relay's and consumer's metrics ports (9101, 9102: their defaults) for free ones."""
    project = tmp_path / "project"
    handlers = example(QUICK, "# myapp/tasks.py")
    assert handlers.path is not None
    (project / handlers.path).parent.mkdir(parents=True)
    (project / handlers.path).write_text(handlers.text)

    port, relay_port, consumer_port = free_port(), free_port(), free_port()
    env = {
        **shell_env,
        "API_PORT": str(port),
        "RELAY_METRICS_PORT": str(relay_port),
        "CONSUMER_METRICS_PORT": str(consumer_port),
    }
    start = example(QUICK, "pip install")
    script = substituted(start.text, {start.text.splitlines()[0] + "\n": ""}) + "wait\n"
    stack = ProcessGroup("api", env, argv=["bash", "-c", script])
    stack.cwd = project
    await stack.launch()
    try:
        for ready in READY.values():
            await stack.wait_for(ready, timeout=30)

        client = example(QUICK, "from taskbox.client import Client")
        (project / "submit.py").write_text(
            substituted(client.text, {"http://127.0.0.1:8000": f"http://127.0.0.1:{port}"})
        )
        (printed,) = re.findall(r"print\(.*\)  # (.*)", client.text)
        ran = await sh(f"{sys.executable} submit.py", env, cwd=project)
        assert ran.code == 0, ran
        assert ran.stdout.strip() == printed, ran

        await quick_start_curls(env, port)
        await metrics_probes(env, relay_port, consumer_port)
        await log_line(stack, port)
    finally:
        await stack.stop_all()


async def quick_start_curls(env: dict[str, str], port: int) -> None:
    create, get = readme.shell_commands(example("Quick start", "curl -i localhost:8000").text)
    at_port = {"localhost:8000": f"localhost:{port}"}
    created = await curl(create, env, at_port)
    location = re.search(r"(?im)^location: (/api/v1/tasks/(\S+))\r?$", created)
    assert location is not None, created
    assert body(created)["status"] == "NEW"  # "status NEW", as the comment says
    # "a moment later": the GET is repeated until the task is DONE
    for _ in range(100):
        shown = await curl(get, env, {**at_port, "<id>": location.group(2)})
        if '"status":"DONE"' in shown:
            break
        await asyncio.sleep(0.1)
    for fragment in ('"status":"DONE"', '"result":{"x":1}'):
        assert fragment in get.notes[0], get.notes  # what the comment promises
        assert fragment in shown, shown


async def log_line(stack: ServiceProcess, port: int) -> None:
    """The Logs section's sample line, from a task failing as its line says (the ``fail``
    type's ``drill``, with a trace): the consumer's text log has a line just like it."""
    (sample,) = example("Logs", "2026-11-26").text.splitlines()
    trace_id = re.search(r"trace_id=([0-9a-f]{32})", sample)
    assert trace_id is not None, sample
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        created = await client.post(
            "/api/v1/tasks",
            json={"type": "fail", "payload": {"message": "drill", "succeed_on_attempt": 2}},
            headers={"traceparent": f"00-{trace_id.group(1)}-00f067aa0ba902b7-01"},
        )
    assert created.status_code == 201, created.text
    pattern = readme.sample_pattern(sample)
    lines: list[str] = []
    for _ in range(200):
        lines = [line for line in stack.lines if created.json()["id"] in line]
        if any(pattern.fullmatch(line) for line in lines):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("\n".join(["no line like", sample, "among", *lines]))


async def metrics_probes(env: dict[str, str], relay_port: int, consumer_port: int) -> None:
    probes = readme.console_commands(example("Metrics and health", "$ curl -s localhost:9101").text)
    ports = {
        "localhost:9101": f"localhost:{relay_port}",
        "localhost:9102": f"localhost:{consumer_port}",
    }
    for probe in probes:
        command = probe.text
        for old, new in ports.items():
            command = command.replace(old, new)
        assert command != probe.text, probe.text
        (sample,) = probe.notes
        for _ in range(100):  # the consumer's channel may still be opening
            output = (await sh(command, env)).stdout.rsplit("\n@@status=", 1)[0]
            if same_shape(json.loads(sample), json.loads(output)):
                break
            await asyncio.sleep(0.1)
        assert same_shape(json.loads(sample), json.loads(output)), (sample, output)


# -- API reference --------------------------------------------------------------------


def table_process(text: str, env: dict[str, str]) -> ServiceProcess:
    """A Commands table example (``NAME=value ... taskbox COMMAND``) as a process."""
    words = shlex.split(text)
    settings: dict[str, str] = {}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        settings[name] = value
    assert words[0] == "taskbox", text
    return ServiceProcess(words[1], {**env, **settings}, argv=[TASKBOX, *words[1:]])


async def test_api_examples(
    tmp_path: Path, shell_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    """The API section's curl commands, in README order, and the Python client, against
    the Commands table's api, relay and consumer (and a second api with ``API_KEYS`` and
    ``METRICS_REQUIRE_AUTH=true`` for the examples that send ``$KEY``). Substituted: the
    ports, ``KEY=...`` and ``api_key="..."`` (a key of that api), ``<next_cursor>`` (one
    the api gave), and the example task id ``0b6f5a8e-...`` (a task created before;
    not in the X-Request-ID example, whose point is the 404)."""
    port, keyed_port = free_port(), free_port()
    commands = readme.command_table_examples()
    api = table_process(substituted(commands[0], {"8080": str(port)}), shell_env)
    keyed = ServiceProcess(
        "api",
        {**shell_env, "API_PORT": str(keyed_port), "API_KEYS": API_KEY},
        argv=[TASKBOX, "api"],
        METRICS_REQUIRE_AUTH="true",
    )
    consumer = table_process(commands[2], {**shell_env, "LOG_FORMAT": "json", "LOG_LEVEL": "DEBUG"})
    for process in (
        api,
        table_process(commands[1], shell_env),
        consumer,
        keyed,
    ):
        processes.append(process)
        await process.start()

    open_api = {"localhost:8000": f"localhost:{port}"}
    with_key = {"localhost:8000": f"localhost:{keyed_port}"}

    not_found, unsupported = [
        command
        for starts in ("curl -i -H 'X-Request-ID", "curl -i localhost:8000")
        for command in readme.shell_commands(example("Request ids: `X-Request-ID`", starts).text)
    ]
    shown = await curl(not_found, shell_env, open_api)
    assert re.search(r"(?im)^x-request-id: checkout-7f3a\r?$", shown), shown
    assert like(sample_json(not_found.notes), body(shown)), (not_found.notes, shown)
    assert body(await curl(unsupported, shell_env, open_api))["status"] == 415

    export, *authenticated = readme.shell_commands(
        example("Authentication and limits", "export KEY=").text
    )
    key = substituted(export.text, {"KEY=...": f"KEY={API_KEY}"}) + "\n"
    for command in authenticated:
        shown = await curl(command, shell_env, with_key, prefix=key)
        if command.expected_status == 401:
            assert re.search(r"(?im)^www-authenticate: Bearer\r?$", shown), shown
            assert like(sample_json(command.notes), body(shown)), (command.notes, shown)
    (too_large,) = readme.shell_commands(
        example("Authentication and limits", "head -c 2000000").text
    )
    shown = await curl(too_large, shell_env, with_key, prefix=key)
    assert body(shown)["detail"] == (
        "the request body (2000000 bytes) exceeds the limit of 1048576 bytes"
    ), shown

    (create,) = readme.shell_commands(
        example("Create a task: `POST /api/v1/tasks`", "curl -i").text
    )
    hashed = body(await curl(create, shell_env, open_api))
    assert (hashed["type"], hashed["priority"], hashed["max_attempts"]) == ("sha256", 5, 5)

    later, at_christmas = readme.shell_commands(
        example("Scheduled tasks: `run_at` and `delay_seconds`", "curl").text
    )
    scheduled = body(await curl(later, shell_env, open_api))
    christmas = body(await curl(at_christmas, shell_env, open_api))
    assert (christmas["status"], christmas["run_at"]) == ("NEW", "2026-12-24T18:00:00Z")

    (keyed_create,) = readme.shell_commands(
        example("Idempotency-Key: safe retries", "curl -i").text
    )
    first = body(await curl(keyed_create, shell_env, open_api))
    # "201 the first time, 200 with the same task on every repeat"
    assert "200 with the same task on every repeat" in keyed_create.notes[0]
    repeat = await curl(keyed_create, shell_env, open_api, status=200)
    assert body(repeat)["id"] == first["id"]

    (batch,) = readme.shell_commands(
        example("Create many tasks: `POST /api/v1/tasks/batch`", "curl").text
    )
    assert [t["status"] for t in body(await curl(batch, shell_env, open_api))["items"]] == [
        "NEW"
    ] * 3

    filtered, paged, full = readme.shell_commands(
        example("List tasks: `GET /api/v1/tasks`", "curl").text
    )
    assert set(body(await curl(filtered, shell_env, open_api))) == {"items", "next_cursor"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        page = (await client.get("/api/v1/tasks", params={"limit": 1})).json()
    assert page["next_cursor"], page
    paged_page = body(
        await curl(paged, shell_env, {**open_api, "<next_cursor>": page["next_cursor"]})
    )
    assert paged_page["items"], paged_page
    await curl(full, shell_env, open_api)

    hashed_id = {**open_api, EXAMPLE_TASK_ID: hashed["id"]}
    (get,) = readme.shell_commands(example("Get a task: `GET /api/v1/tasks/{id}`", "curl").text)
    assert body(await curl(get, shell_env, hashed_id))["payload"] == {"text": "hello"}
    (status,) = readme.shell_commands(
        example("Get just the status: `GET /api/v1/tasks/{id}/status`", "curl").text
    )
    sample_keys = set(re.findall(r'"(\w+)":', status.notes[0]))
    assert set(body(await curl(status, shell_env, hashed_id))) == sample_keys

    # The sha256 task runs meanwhile: each long poll answers once it is DONE.
    for waiting in readme.shell_commands(example("Waiting for a result", 'curl "localhost').text):
        assert body(await curl(waiting, shell_env, hashed_id))["status"] == "DONE"
    (stream,) = readme.shell_commands(example("Waiting for a result", "curl -N localhost").text)
    # A finished task's stream: its state, then the end.
    shown = await curl(stream, shell_env, hashed_id)
    assert shown.startswith("retry: 3000\nevent: task\ndata: "), shown
    assert json.loads(shown.split("data: ", 1)[1].split("\n", 1)[0])["status"] == "DONE"

    (cancel,) = readme.shell_commands(
        example("Cancel a task: `DELETE /api/v1/tasks/{id}`", "curl").text
    )
    cancelled = body(await curl(cancel, shell_env, {**open_api, EXAMPLE_TASK_ID: scheduled["id"]}))
    assert cancelled["status"] == "CANCELLED"  # NEW (it waits 30 s): 200, CANCELLED

    for probe in readme.shell_commands(
        example("Health: `GET /healthz`, `GET /readyz`", "curl").text
    ):
        shown = await curl(probe, shell_env, open_api)
        if said := re.search(r"# (\{.*?\})", probe.text):  # the answer its comment gives
            assert json.loads(shown) == json.loads(said.group(1)), (probe.text, shown)

    (traced,) = readme.shell_commands(example("Tracing: the `traceparent` header", "curl").text)
    task_id = body(await curl(traced, shell_env, open_api))["id"]
    assert traced.notes[0] == "# consumer, LOG_FORMAT=json, LOG_LEVEL=DEBUG:"  # as it runs here
    logged = sample_json(traced.notes)
    # the sample's task id and outbox id are another run's
    expected = {**logged, "task_id": task_id, "outbox_id": 0}
    lines: list[Any] = []
    for _ in range(200):
        lines = [json.loads(line) for line in consumer.lines if task_id in line]
        if any(like(expected, {**line, "outbox_id": 0}) for line in lines):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"no consumer line like {logged} among {lines}")

    # Periodic tasks: each curl, on the api with a key, in README order (create, get,
    # PATCH, pause, resume, run now, delete), each answering the status its comment says.
    for command in readme.shell_commands(
        example(PERIODIC, "curl -s -X POST localhost:8000/api/v1/schedules").text
    ):
        shown = await curl(command, shell_env, with_key, prefix=key)
        if "/run " in command.text + " ":
            assert body(shown)["status"] == "NEW", shown
        elif "-X DELETE" not in command.text:
            assert body(shown)["name"] == "weekday-report", shown

    program = example("Python client", "from taskbox.client import")
    (tmp_path / "client_example.py").write_text(
        substituted(
            program.text,
            {
                "http://127.0.0.1:8000": f"http://127.0.0.1:{keyed_port}",
                'api_key="..."': f'api_key="{API_KEY}"',
            },
        )
    )
    ran = await sh(f"{sys.executable} client_example.py", shell_env, cwd=tmp_path)
    assert ran.code == 0, ran
    digest = hashlib.sha256(b"hello").hexdigest()
    printed = ran.stdout.splitlines()
    assert printed[0] == f"DONE {{'sha256': '{digest}'}}", ran
    # no FAILED sha256 task to list; the cancel of the DONE task: "409 <detail> <request id>"
    assert len(printed) == 2 and printed[1].startswith("409 task "), ran


# -- Operating Taskbox ----------------------------------------------------------------


async def test_operator_commands(
    pool: asyncpg.Pool,
    shell_env: dict[str, str],
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
) -> None:
    """Status, replay and cleanup as the README shows them, their output held to its
    samples (ids, counts and times may differ, words may not), on the situation they
    describe: three tasks PENDING for 12 minutes, lost by the broker; published outbox
    rows past OUTBOX_RETENTION; a task finished more than 30 days ago. Then the Commands
    table's migrate (its URL, the README's own database, -> a new database of this
    test, dropped after) and ``roles --dry-run``. Substituted in the samples: the
    database, queue names and the operator's user@host."""
    for type_, payload in (("echo", {"n": 1}), ("echo", {"n": 2}), ("sha256", {"text": "hi"})):
        await create_task(pool, NewTask(type=type_, payload=payload, priority=0, max_attempts=3))
        await asyncio.sleep(0.01)  # distinct creation times: the table lists oldest first
    await pool.execute(
        "UPDATE tasks SET status = 'PENDING', created_at = created_at - interval '12 minutes', "
        "updated_at = now() - interval '12 minutes'"
    )
    await pool.execute("UPDATE outbox SET published_at = now() - interval '12 minutes'")
    async with topology(broker_settings):
        pass  # the queues exist, as once a relay or consumer ran: their depths are shown
    literals = {
        "5432/taskbox": re.escape("5432/" + db_settings.database_url.rsplit("/", 1)[1]),
        "taskbox.tasks": re.escape(broker_settings.queue_name),
        "taskbox.dead": re.escape(broker_settings.dead_letter_queue),
        "alice@ops-1": r"\S+@\S+",
    }

    async def run_console(heading: str, starts: str) -> None:
        for command in readme.console_commands(example(heading, starts).text):
            result = await sh(command.text, shell_env)
            assert result.code == 0, f"$ {command.text}\n{result}"
            why = readme.mismatch(command.notes, result.stdout, literals)
            assert why is None, f"$ {command.text}\n{why}\n{result}"

    await run_console("Status: one screen", "$ taskbox status")
    table = readme.command_table_examples()
    status_json = await sh(table[5], shell_env)
    assert status_json.code == 0, status_json
    assert json.loads(status_json.stdout)

    dry_run = example("Replay: send tasks again", "$ taskbox replay --stale-for 10m --dry-run")
    assert dry_run.first_line == f"$ {table[4]}"  # the table's example, run with its output
    await run_console("Replay: send tasks again", "$ taskbox replay --stale-for 10m --dry-run")
    await run_console("Replay: send tasks again", "$ taskbox replay --stale-for 10m --reason")

    await pool.execute(
        "UPDATE outbox SET created_at = now() - interval '8 days', "
        "published_at = now() - interval '8 days' WHERE published_at IS NOT NULL"
    )
    old = await create_task(pool, NewTask(type="echo", payload={}, priority=0, max_attempts=3))
    await pool.execute(
        "UPDATE tasks SET status = 'DONE', created_at = now() - interval '32 days', "
        "finished_at = now() - interval '31 days' WHERE id = $1",
        old["id"],
    )
    cleanup = example("Retention", "$ taskbox cleanup")
    assert f"$ {table[6]}" in cleanup.text.splitlines()  # the table's example, run with its output
    await run_console("Retention", "$ taskbox cleanup")
    assert await pool.fetchval("SELECT count(*) FROM tasks WHERE id = $1", old["id"]) == 0
    assert await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == 0

    roles = await sh(table[7], shell_env)
    assert roles.code == 0, roles
    await pool.execute(
        "INSERT INTO schedules (name, task_type, cron, next_fire_at)"
        " VALUES ('nightly', 'echo', '0 3 * * *', now() + interval '1 hour')"
    )
    listed = await sh(table[9], shell_env)
    assert listed.code == 0 and "nightly  echo  cron 0 3 * * * (UTC)" in listed.stdout, listed

    name = f"taskbox_readme_{uuid.uuid4().hex[:12]}"
    migrate = substituted(table[3], {"postgresql://postgres@127.0.0.1/taskbox": database_dsn(name)})
    try:
        migrated = await sh(migrate, shell_env)
        assert migrated.code == 0, migrated
        assert "database is at the latest migration" in migrated.stdout, migrated
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def test_queue_commands(pool: asyncpg.Pool, shell_env: dict[str, str]) -> None:
    """The README's `taskbox queues` lines, in order, and the Commands table's example:
    each exits 0 and does what its comment says (a pause shows PAUSED with its reason
    and who, the events list both actions, the resume unparks the queue's waiting task)."""
    await create_task(
        pool, NewTask(type="echo", payload={}, priority=0, max_attempts=3, queue="media")
    )
    block = example(PAUSING, "taskbox queues")
    lines = [line.split("#")[0].strip() for line in block.text.splitlines()]
    commands = [line for line in lines if line]
    assert [c.split()[:3] for c in commands] == [
        ["taskbox", "queues"],
        ["taskbox", "queues", "pause"],
        ["taskbox", "queues", "show"],
        ["taskbox", "queues", "resume"],
    ]
    listed, paused, shown, resumed = [await sh(command, shell_env) for command in commands]
    for result in (listed, paused, shown, resumed):
        assert result.code == 0, result
    assert "media: 1 waiting" in listed.stdout, listed
    assert paused.stdout.strip() == "queue media: paused", paused
    assert "PAUSED by " in shown.stdout and "image service down, INC-1234" in shown.stdout, shown
    assert " pause  by " in shown.stdout, shown
    assert resumed.stdout.strip().startswith("queue media: resumed"), resumed
    events = await pool.fetch("SELECT action FROM queue_events WHERE queue = 'media' ORDER BY id")
    assert [e["action"] for e in events] == ["pause", "resume"]

    table_example = readme.command_table_examples()[8]
    assert table_example.startswith("taskbox queues pause media")
    again = await sh(table_example, shell_env)
    assert again.code == 0 and "paused" in again.stdout, again
    assert (
        await pool.fetchval("SELECT reason FROM queue_pauses WHERE queue = 'media'") == "INC-1234"
    )
    no_reason = await sh("taskbox queues pause media", shell_env)
    assert no_reason.code == 2 and "--reason" in no_reason.stderr, no_reason


async def test_task_commands(pool: asyncpg.Pool, shell_env: dict[str, str]) -> None:
    """The README's `taskbox tasks` lines, in order, and the Commands table's example:
    each exits 0 and does what it says (the dry runs change nothing, the cancel cancels
    the queue's waiting tasks, the retry sends the recent FAILED sha256 task again)."""
    waiting = [
        (await create_task(pool, NewTask("resize", {}, 0, 3, queue="media")))["id"]
        for _ in range(2)
    ]
    failed = (await create_task(pool, NewTask("sha256", {"text": "x"}, 0, 3)))["id"]
    await pool.execute("UPDATE tasks SET status = 'FAILED', attempts = 3 WHERE id = $1", failed)
    block = example(BULK, "taskbox tasks cancel")
    commands = [line for line in block.text.splitlines() if line.strip()]
    assert [c.split()[:3] for c in commands] == [["taskbox", "tasks", "cancel"]] * 2 + [
        ["taskbox", "tasks", "retry"]
    ] * 2

    table_example = readme.command_table_examples()[10]
    assert table_example.startswith("taskbox tasks cancel")
    looked = await sh(table_example, shell_env)
    assert looked.code == 0 and "selected 2, would cancel 2, would skip 0" in looked.stdout, looked

    dry, cancel, retry, by_id = [await sh(command, shell_env) for command in commands]
    for result in (dry, cancel, retry, by_id):
        assert result.code == 0, result
    assert "selected 2, would cancel 2" in dry.stdout, dry
    assert "selected 2, changed 2, skipped 0" in cancel.stdout, cancel
    assert "selected 1, changed 1, skipped 0" in retry.stdout, retry
    assert "selected 0" in by_id.stdout, by_id  # the README's example id names no task here
    statuses = await pool.fetch("SELECT id, status FROM tasks")
    assert {row["id"]: row["status"] for row in statuses} == {
        waiting[0]: "CANCELLED",
        waiting[1]: "CANCELLED",
        failed: "NEW",
    }
    actions = await pool.fetch("SELECT action, dry_run, reason FROM task_actions ORDER BY id")
    assert [tuple(row) for row in actions] == [
        ("cancel", True, "INC-1234"),
        ("cancel", True, "INC-1234"),
        ("cancel", False, "INC-1234"),
        ("retry", False, "bad deploy"),
        ("retry", False, "rerun"),
    ]


# -- Webhooks -------------------------------------------------------------------------


async def test_webhook_examples(
    pool: asyncpg.Pool, shell_env: dict[str, str], processes: list[ServiceProcess]
) -> None:
    """The Webhooks section's curl commands, in README order, on an api with a key, the
    local receiver's address allowed and a callback secret. Substituted: the port,
    ``$KEY``'s value, the example URLs (-> a loopback URL the allow-list admits), ``<id>``
    (the webhook the first command made) and ``<delivery_id>`` (a failed delivery of it,
    written here as the delivery worker would leave one)."""
    port = free_port()
    api = ServiceProcess(
        "api",
        {**shell_env, "API_PORT": str(port), "API_KEYS": API_KEY},
        argv=[TASKBOX, "api"],
        WEBHOOK_ALLOWED_HOSTS="127.0.0.1",
        WEBHOOK_CALLBACK_SECRET=new_secret(),
    )
    processes.append(api)
    await api.start()
    key = f"export KEY={API_KEY}\n"
    known = {
        "localhost:8000": f"localhost:{port}",
        "https://hooks.example.com/taskbox": "http://127.0.0.1:9/taskbox",
        "https://hooks.example.com/task-done": "http://127.0.0.1:9/task-done",
    }
    block = example(WEBHOOKS, "curl -s -X POST localhost:8000/api/v1/webhooks")
    for command in readme.shell_commands(block.text):
        if "/deliveries?status=failed" in command.text:
            task = await create_task(pool, NewTask("echo", {}, 0, 3))
            known["<task_id>"] = str(task["id"])
            known["<delivery_id>"] = str(
                await pool.fetchval(
                    "INSERT INTO webhook_deliveries"
                    " (webhook_id, url, task_id, event, body, status, attempts)"
                    " VALUES ($1, 'http://127.0.0.1:9/taskbox', $2, 'task.failed',"
                    " '{\"type\": \"task.failed\"}', 'failed', 8) RETURNING id",
                    uuid.UUID(known["<id>"]),
                    task["id"],
                )
            )
        replacements = {old: new for old, new in known.items() if old in command.text}
        shown = await curl(command, shell_env, replacements, prefix=key)
        if "-X DELETE" in command.text:
            continue
        answer = body(shown)
        if "<id>" not in known:  # the create, the first command
            assert answer["secret"].startswith("whsec_"), answer
            known["<id>"] = answer["id"]
        elif "rotate-secret" in command.text:
            assert answer["previous_secret_expires_at"] is not None, answer
        elif "/deliveries?" in command.text:
            assert [d["id"] for d in answer["items"]] == [known["<delivery_id>"]], answer
        elif "/replay-failed" in command.text:
            assert answer == {"replayed": 0}, answer
        elif command.text.endswith('/replay -H "Authorization: Bearer $KEY"'):
            assert answer["status"] == "pending", answer
        elif "/webhook-deliveries -H" in command.text:
            assert [d["id"] for d in answer["items"]] == [known["<delivery_id>"]], answer
        elif "/api/v1/tasks" in command.text:
            assert answer["status"] == "NEW", answer
    callback = await pool.fetchval("SELECT callback_url FROM tasks WHERE callback_url IS NOT NULL")
    assert callback == "http://127.0.0.1:9/task-done"


def test_the_webhook_receiver_example_verifies_deliveries(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The receiver snippet, with a secret of this test: a delivery signed as the relay
    signs it is handled once (its repeat is acknowledged, not handled again), a forged
    one is refused."""
    secret = new_secret()
    program = substituted(
        example(WEBHOOKS, "from standardwebhooks import").text,
        {'Webhook("whsec_...")': f'Webhook("{secret}")'},
    )
    scope: dict[str, Any] = {}
    exec(compile(program, "README receiver example", "exec"), scope)
    body = b'{"type":"task.done","data":{"id":"t1","result":{"ok":true}}}'
    now = int(time.time())
    headers = {
        "webhook-id": "d1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign([secret], "d1", now, body),
    }
    assert scope["handle"](body, headers) == 204
    assert scope["handle"](body, headers) == 204
    assert capsys.readouterr().out == "task.done t1 {'ok': True}\n"
    assert scope["handle"](body.replace(b"t1", b"t2"), headers) == 400
