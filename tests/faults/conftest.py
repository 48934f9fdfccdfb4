"""Fixtures of the fault suite: TCP proxies in front of Postgres and RabbitMQ, the test's
processes, the transition audit, and a report that pytest shows with or without ``-s``.

The per-test database copy, broker names and ``service_env`` come from tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator

import asyncpg
import pytest

from tests.conftest import AMQP_URL
from tests.faults.cluster import Cluster, broker_accepts, install_audit, rabbitmqctl, wait_until
from tests.faults.proxy import TcpProxy

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


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``fault_report(line)`` prints ``line`` and repeats it in pytest's terminal summary."""
    lines = request.config.stash.setdefault(_REPORT, [])

    def report(line: str) -> None:
        print(line)
        lines.append(line)

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = terminalreporter.config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.write_sep("=", "fault suite")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
async def pg_proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy.to_url(database_url).start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def amqp_proxy() -> AsyncIterator[TcpProxy]:
    proxy = await TcpProxy.to_url(AMQP_URL).start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def cluster(
    service_env: dict[str, str], request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    """The test's processes; their logs are printed when the test failed."""
    procs = Cluster(service_env)
    yield procs
    await procs.close()
    if request.node.stash.get(_FAILED, False):
        print(procs.logs())


@pytest.fixture
async def audited(pool: asyncpg.Pool) -> asyncpg.Pool:
    """The test's pool, on a database whose task transitions are audited."""
    await install_audit(pool)
    return pool


@pytest.fixture
async def broker_guard() -> AsyncIterator[None]:
    """Whatever happens in the test, RabbitMQ accepts connections again afterwards."""
    yield
    if not await broker_accepts(AMQP_URL):
        await rabbitmqctl("start_app")
        await wait_until(lambda: broker_accepts(AMQP_URL), bool, "RabbitMQ accepts", 60, 0.2)
