"""What the fault tests share: the processes of one test, an audit of task transitions,
the broker's stop/start, and polling with a deadline.

The audit is a trigger the tests install in their own database copy. It records every
UPDATE of a task that changes its status, attempts, result or lease (the fencing
token), which of Taskbox's statements made it (claim, finish, rescue, relay, cancel),
and who: the writer's application_name and transaction. So a checker can count how
often a task's outcome was committed, and by whom under which lease, without trusting
the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aio_pika
import asyncpg

from tests.integration.processes import ServiceProcess, free_port

T = TypeVar("T")

TERMINAL = ("DONE", "FAILED", "CANCELLED")

# Short timings, so heartbeats, rescues and retries happen within a test's patience.
# Several relays and consumers share this host: none serves metrics on its (one)
# default port.
FAST_RELAY = {
    "RELAY_POLL_INTERVAL": "0.2",
    "RELAY_LISTEN_CHECK_INTERVAL": "1",
    "RELAY_METRICS_PORT": "0",
}
FAST_CONSUMER = {
    "HEARTBEAT_INTERVAL": "0.5",
    "TASK_STALE_AFTER": "3",
    "RESCUE_INTERVAL": "0.5",
    "RETRY_BASE_DELAY": "0.05",
    "RETRY_MAX_DELAY": "0.5",
    "CONSUMER_METRICS_PORT": "0",
}

# The statement behind each audited change, recognised by a fragment of its text
# (db/execution.py, db/outbox.py, db/tasks.py).
INSTALL_AUDIT = """
CREATE TABLE fault_audit (
    seq bigserial PRIMARY KEY,
    task_id uuid NOT NULL,
    old_status text NOT NULL,
    new_status text NOT NULL,
    old_attempts int NOT NULL,
    new_attempts int NOT NULL,
    worker_id text,
    old_lease bigint NOT NULL,
    new_lease bigint NOT NULL,
    app text NOT NULL,  -- the writer's application_name
    txid bigint NOT NULL,
    source text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION fault_audit() RETURNS trigger LANGUAGE plpgsql
-- Its own search_path: the api's cancel_task() runs with only pg_catalog on its path.
SET search_path = public AS $$
DECLARE
    q text := current_query();
BEGIN
    INSERT INTO fault_audit
        (task_id, old_status, new_status, old_attempts, new_attempts, worker_id,
         old_lease, new_lease, app, txid, source)
    VALUES (NEW.id, OLD.status, NEW.status, OLD.attempts, NEW.attempts, NEW.worker_id,
        OLD.lease, NEW.lease, current_setting('application_name'), txid_current(),
        CASE WHEN strpos(q, 'jsonb_to_recordset') > 0 THEN 'finish'
             WHEN strpos(q, 'stale AS') > 0 THEN 'rescue'
             WHEN strpos(q, 'claimed AS') > 0 THEN 'claim'
             WHEN strpos(q, 'published AS') > 0 THEN 'relay'
             WHEN strpos(q, 'cancel_task(') > 0 THEN 'cancel'
             ELSE 'other' END);
    RETURN NULL;
END
$$;
CREATE TRIGGER fault_audit AFTER UPDATE ON tasks FOR EACH ROW
WHEN (OLD.status IS DISTINCT FROM NEW.status
      OR OLD.attempts IS DISTINCT FROM NEW.attempts
      OR OLD.result IS DISTINCT FROM NEW.result
      OR OLD.lease IS DISTINCT FROM NEW.lease)
EXECUTE FUNCTION fault_audit();
"""

# Tasks whose terminal outcome was written more than once.
TERMINAL_WRITTEN_TWICE = """
SELECT task_id, array_agg(new_status || '<-' || source ORDER BY seq) AS writes
FROM fault_audit WHERE new_status IN ('DONE', 'FAILED', 'CANCELLED')
GROUP BY task_id HAVING count(*) > 1
"""


# Writes by a consumer whose lease was not the current one. Every claim takes a new
# lease (one more than the last: unique per task) and ends the one before; an outcome
# (finish: DONE, FAILED, CANCELLED, a retry's NEW, a release's PENDING), a rescue or a
# takeover claim ends the lease the task was PROCESSING under. A stale writer shows as
# either
# - a lease ended twice: a second transition out of PROCESSING under one lease (the
#   first writer moved the task on, a second one wrote over it anyway), or
# - an outcome written under a lease that another process claimed: the write
#   matched the current lease's row, but came from a consumer whose own lease was an
#   older one (a fence that checked only the status would let it in), or
# - an outcome written over a task that was not PROCESSING at all (no fence at all).
# Each consumer process has an application_name of its own for the second check.
STALE_WRITES = """
WITH ended AS (
    SELECT * FROM fault_audit
    WHERE old_status = 'PROCESSING'
      AND (new_status <> 'PROCESSING' OR new_lease <> old_lease)
)
SELECT e.task_id, e.old_lease AS lease,
       'lease ended ' || count(*) || ' times: '
       || string_agg(e.new_status || '<-' || e.source || ' by ' || e.app, ', ' ORDER BY e.seq)
           AS why
FROM ended AS e GROUP BY e.task_id, e.old_lease HAVING count(*) > 1
UNION ALL
SELECT e.task_id, e.old_lease,
       e.new_status || '<-finish by ' || e.app || ' under a lease claimed by '
       || coalesce(c.app, 'nobody')
FROM ended AS e
LEFT JOIN fault_audit AS c
  ON c.task_id = e.task_id AND c.source = 'claim' AND c.new_lease = e.old_lease
WHERE e.source = 'finish' AND c.app IS DISTINCT FROM e.app
UNION ALL
SELECT task_id, old_lease, new_status || '<-finish by ' || app || ' of a task ' || old_status
FROM fault_audit WHERE source = 'finish' AND old_status <> 'PROCESSING'
"""


async def install_audit(pool: asyncpg.Pool) -> None:
    await pool.execute(INSTALL_AUDIT)


async def wait_until(
    check: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    what: str,
    within: float,
    every: float = 0.1,
    context: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``check`` until ``accept`` holds for its value; fail with the last value."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}; last value {value!r}\n{context()}")
        await asyncio.sleep(every)


def running(proc: ServiceProcess) -> bool:
    return proc.proc is not None and proc.proc.returncode is None


class Cluster:
    """Every process one test started; whatever still runs is killed at teardown."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[ServiceProcess] = []

    async def start(self, module: str, **extra_env: str) -> ServiceProcess:
        proc = ServiceProcess(module, self.env, **extra_env)
        self.procs.append(proc)
        return await proc.start()

    async def api(self, **extra_env: str) -> tuple[ServiceProcess, str]:
        """An api process on a free port, and its base URL."""
        port = free_port()
        proc = await self.start("api", API_PORT=str(port), API_ACCESS_LOG="false", **extra_env)
        return proc, f"http://127.0.0.1:{port}"

    async def relay(self, **extra_env: str) -> ServiceProcess:
        return await self.start("relay", **{**FAST_RELAY, **extra_env})

    async def consumer(self, **extra_env: str) -> ServiceProcess:
        return await self.start("consumer", **{**FAST_CONSUMER, **extra_env})

    async def restart(self, proc: ServiceProcess) -> ServiceProcess:
        """A new process with the same module and environment (a supervisor's restart)."""
        fresh = ServiceProcess(proc.module, proc.env)
        self.procs.append(fresh)
        return await fresh.start()

    def logs(self, tail: int = 400) -> str:
        parts = []
        for proc in self.procs:
            pid = proc.proc.pid if proc.proc is not None else None
            code = proc.proc.returncode if proc.proc is not None else None
            lines = "\n".join(proc.lines[-tail:])
            parts.append(f"----- {proc.module} pid {pid} exit {code} -----\n{lines}")
        return "\n".join(parts)

    async def close(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            if proc.proc is not None:
                with contextlib.suppress(TimeoutError):
                    await proc.wait(timeout=10)


async def stop_cleanly(*procs: ServiceProcess) -> None:
    """SIGTERM each relay/consumer; each must exit 0."""
    for proc in procs:
        code = await proc.stop(signal.SIGTERM, timeout=30)
        assert code == 0, f"{proc.module} exited {code} on SIGTERM:\n{proc.output}"


# -- the broker ------------------------------------------------------------------------


def rabbitmqctl_available() -> bool:
    return shutil.which("rabbitmqctl") is not None


async def rabbitmqctl(*args: str, timeout: float = 60.0) -> None:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(timeout):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out.decode(errors='replace')}"


async def broker_accepts(url: str) -> bool:
    try:
        async with asyncio.timeout(5):
            connection = await aio_pika.connect(url)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError):
        return False
    await connection.close()
    return True


async def restart_broker(url: str, down_for: float) -> None:
    """``rabbitmqctl stop_app``, ``down_for`` seconds, ``start_app``; the broker is always
    started again and accepting connections when this returns or raises."""
    try:
        await rabbitmqctl("stop_app")
        await asyncio.sleep(down_for)  # the outage itself
    finally:
        await rabbitmqctl("start_app")
        await wait_until(lambda: broker_accepts(url), bool, "RabbitMQ accepts again", 60, 0.2)
