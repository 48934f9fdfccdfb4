"""``make fuzz``: schemathesis against a real API process over a fresh, migrated database.

The API runs as ``python -m taskbox.api`` (uvicorn, as in production) with an API key set, on
a database created for this run alone and dropped afterwards. Schemathesis generates
requests from the app's own OpenAPI document, valid and invalid ones, with what
Postgres, asyncpg and the encoder refuse mixed in (``hooks.py``: NULs, lone surrogates,
moments at and past the ends of the range, forged cursors), and checks every answer
against it. A run fails when schemathesis reports a failure, or when the API
logged an error (a 5xx that schemathesis' checks might not pin on one request).

Options go to ``schemathesis run`` (after the driver's): ``make fuzz FUZZ_ARGS='--seed 42'``;
its settings are in ``schemathesis.toml`` beside this file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# The test suite's own helpers: the admin connection and database naming of
# tests/conftest.py, a free port as the process tests pick one.
from tests.conftest import ROOT, _admin, database_dsn
from tests.integration.processes import free_port

CONFIG = Path(__file__).with_name("schemathesis.toml")

# /metrics is left out of the published document on purpose (it is for Prometheus, not
# for API clients); the fuzzer gets it documented so that it is exercised too.
METRICS_OPERATION: dict[str, Any] = {
    "get": {
        "summary": "Prometheus metrics of the API process",
        "operationId": "metrics",
        "responses": {
            "200": {
                "description": "Metrics",
                "content": {"text/plain": {}},
                "headers": {"X-Request-ID": {"required": True, "schema": {"type": "string"}}},
            }
        },
    }
}


@contextmanager
def fresh_database() -> Iterator[str]:
    """A database migrated with the real ``python -m taskbox.db migrate``; dropped on exit."""
    name = f"taskbox_fuzz_{uuid.uuid4().hex[:12]}"
    url = database_dsn(name)
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        migrated = subprocess.run(
            [sys.executable, "-m", "taskbox.db", "migrate"],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": url},
            capture_output=True,
            text=True,
        )
        if migrated.returncode != 0:
            raise SystemExit(f"migration failed:\n{migrated.stderr}")
        yield url
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextmanager
def api_process(database_url: str, api_key: str, log_path: Path) -> Iterator[str]:
    """``python -m taskbox.api`` on a free loopback port; yields its base URL once it is ready."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "OUTBOX_CHANNEL": f"fuzz_{uuid.uuid4().hex[:10]}",
        "API_HOST": "127.0.0.1",
        "API_PORT": str(port),
        "API_WORKERS": "1",
        "API_KEYS": api_key,
        # One line per request would be thousands of lines; errors are still logged.
        "API_ACCESS_LOG": "false",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
        # Long polls and event streams hold a request until their time is up: short
        # ones keep every generated wait and stream to a fraction of a second (the
        # document carries the cap, so generated waits stay within it).
        "TASK_WAIT_MAX": "0.05",
        "TASK_EVENTS_MAX_STREAM": "0.05",
        "TASK_EVENTS_HEARTBEAT": "0.02",
    }
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskbox.api"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the api exited:\n{log_path.read_text()}")
                try:
                    if _get(f"{base}/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"the api did not become ready:\n{log_path.read_text()}")
                time.sleep(0.1)
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def fuzz_schema(base: str, path: Path) -> None:
    """The app's own OpenAPI document, with /metrics added (see METRICS_OPERATION)."""
    status, body = _get(f"{base}/openapi.json")
    if status != 200:
        raise SystemExit(f"GET /openapi.json answered {status}")
    schema = json.loads(body)
    schema["paths"].setdefault("/metrics", METRICS_OPERATION)
    path.write_text(json.dumps(schema))


def logged_errors(log_path: Path) -> list[dict[str, Any]]:
    """The API's log lines at ERROR or above (LOG_FORMAT=json: one object a line)."""
    errors = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            # Not ours (uvicorn before logging is configured, a crash): count it.
            errors.append({"level": "?", "message": line})
            continue
        if isinstance(entry, dict) and entry.get("level") in ("ERROR", "CRITICAL"):
            errors.append(entry)
    return errors


def summarise(report_path: Path) -> tuple[Counter[int], Counter[str]]:
    """Counts from schemathesis' NDJSON event stream: requests by status, checks."""
    statuses: Counter[int] = Counter()
    checks: Counter[str] = Counter()
    for line in report_path.read_text().splitlines():
        finished = json.loads(line).get("ScenarioFinished")
        recorder = (finished or {}).get("recorder") or {}
        for interaction in recorder.get("interactions", {}).values():
            if interaction.get("response"):
                statuses[interaction["response"]["status_code"]] += 1
        for results in recorder.get("checks", {}).values():
            checks.update(result["status"] for result in results)
    return statuses, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__)
    # Every option this driver does not know is schemathesis'.
    _, passthrough = parser.parse_known_args(argv)
    api_key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="taskbox-fuzz-") as scratch:
        work = Path(scratch)
        log_path, schema_path, report_path = (
            work / "api.log",
            work / "openapi.json",
            work / "events.ndjson",
        )
        with fresh_database() as database_url, api_process(database_url, api_key, log_path) as base:
            fuzz_schema(base, schema_path)
            command = [
                str(Path(sys.executable).with_name("schemathesis")),
                "--config-file",
                str(CONFIG),
                "run",
                str(schema_path),
                "--url",
                base,
                "--header",
                f"Authorization: Bearer {api_key}",
                "--report",
                "ndjson",
                "--report-ndjson-path",
                str(report_path),
                *passthrough,
            ]
            started = time.monotonic()
            outcome = subprocess.run(command, cwd=ROOT)
            elapsed = time.monotonic() - started
        errors = logged_errors(log_path)
        statuses, checks = (
            summarise(report_path) if report_path.exists() else (Counter(), Counter())
        )
    for entry in errors[:20]:
        print("api logged:", json.dumps(entry)[:2000], file=sys.stderr)
    by_status = ", ".join(f"{code}: {n}" for code, n in sorted(statuses.items()))
    print(
        f"fuzz summary: {statuses.total()} requests ({by_status}); "
        f"{checks.total()} checks, {checks['failure']} failed; "
        f"{len(errors)} error lines in the api log; {elapsed:.0f}s; "
        f"schemathesis exit code {outcome.returncode}"
    )
    return 1 if outcome.returncode != 0 or errors else 0


if __name__ == "__main__":
    sys.exit(main())
