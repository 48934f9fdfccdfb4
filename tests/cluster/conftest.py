"""Fixtures of the cluster suite: one three-node RabbitMQ cluster per session (started
only when a test here asks for it), the test's broker names on it with quorum queues,
and a report that pytest repeats in its summary.

The per-test database copy comes from tests/conftest.py; the processes, the audit and
the checks from tests/faults/cluster.py.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path

import asyncpg
import pytest

from taskbox.broker.connection import connect
from taskbox.broker.settings import BrokerSettings
from tests.cluster.rabbit_cluster import RabbitCluster, rabbitmq_installed
from tests.faults.cluster import Cluster, install_audit

_REPORT = pytest.StashKey[list[str]]()
_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.write_sep("=", "RabbitMQ cluster suite")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def cluster_report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``cluster_report(line)`` prints ``line`` and repeats it in pytest's summary."""
    lines = request.config.stash.setdefault(_REPORT, [])

    def report(line: str) -> None:
        print(line)
        lines.append(line)

    return report


@pytest.fixture(scope="session")
async def rabbit() -> AsyncIterator[RabbitCluster]:
    """Three RabbitMQ nodes clustered on loopback; stopped and deleted afterwards."""
    if not rabbitmq_installed():
        pytest.skip("rabbitmq-server is not installed (/usr/lib/rabbitmq/bin)")
    cluster = RabbitCluster()
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.close()


@pytest.fixture
async def broker_settings(rabbit: RabbitCluster) -> AsyncIterator[BrokerSettings]:
    """This test's exchange and queue names, on the cluster, as quorum queues; deleted
    afterwards (the root conftest's fixture of the same name uses the default node)."""
    prefix = f"test.{uuid.uuid4().hex[:10]}"
    settings = BrokerSettings(
        amqp_url=rabbit.amqp_url,
        queue_type="quorum",
        exchange_name=f"{prefix}.tasks",
        queue_name=f"{prefix}.tasks",
        dead_letter_exchange=f"{prefix}.dlx",
        dead_letter_queue=f"{prefix}.dead",
    )
    yield settings
    connection = await connect(settings.amqp_urls, connect_timeout=10)
    async with connection:
        channel = await connection.channel()
        for queue in (
            settings.queue_name,
            settings.dead_letter_queue,
            settings.dead_letter_watch_queue,
        ):
            await channel.queue_delete(queue)
        for exchange in (settings.exchange_name, settings.dead_letter_exchange):
            await channel.exchange_delete(exchange)


@pytest.fixture
def service_env(service_env: dict[str, str]) -> dict[str, str]:
    """The root environment (whose AMQP_URL already lists the cluster's nodes), with
    quorum queues."""
    return {**service_env, "QUEUE_TYPE": "quorum"}


@pytest.fixture
async def processes(
    service_env: dict[str, str], request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    """The test's api, relays and consumers; their logs are printed when it failed."""
    procs = Cluster(service_env)
    yield procs
    await procs.close()
    if request.node.stash.get(_FAILED, False):
        print(procs.logs(tail=100))
        # The whole of them, for a failure whose start scrolled out of the tail.
        path = Path(tempfile.gettempdir()) / f"taskbox-cluster-{request.node.name}.log"
        path.write_text(procs.logs(tail=1_000_000))
        print(f"every line of every process: {path}")


@pytest.fixture
async def audited(pool: asyncpg.Pool) -> asyncpg.Pool:
    """The test's pool, on a database whose task transitions are audited."""
    await install_audit(pool)
    return pool
