"""Taskbox on a three-node RabbitMQ cluster with quorum queues, under load, while nodes
fail: the queue leader's node SIGKILLed, the leader's node cut off from the others (a
partition: RabbitCluster.partition), and every node restarted in turn (a rolling
upgrade). An api, two relays and two consumers run with AMQP_URL naming all three
nodes. For the leader's node killed or cut off, every process starts on that node, so
all of them must move for publishing and consuming to go on without it; for the
rolling restart each starts on another node. Tasks arrive at a steady rate over HTTP
throughout.

After each fault every task the api acknowledged must be DONE, with
``lost=0 stuck=0 results_committed_twice=0`` (and no stale writes) from the audit
trigger of tests/faults/cluster.py. The longest time without a publish from the fault
on is measured and printed; it is asserted only against a generous bound, as a
liveness check (publishing came back by itself), not as a speed target.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
import pytest

from taskbox.broker.settings import BrokerSettings
from tests.cluster.load import Load, PublishWatch, all_terminal, outcome
from tests.cluster.rabbit_cluster import RabbitCluster, RabbitNode
from tests.faults.cluster import Cluster, wait_until

RATE = 40.0  # tasks per second, all through the fault
WARMUP = 3.0  # seconds of load before the fault
SETTLE = 4.0  # seconds of load after the fault is over
DRAIN = 90.0  # seconds for every task to be DONE after the load stops
STALL_BOUND = 45.0  # liveness only: publishing must come back by itself within this
RESUME_BOUND = 30.0  # liveness only: with a node down, publishing and consuming resume


def rotated(urls: list[str], by: int) -> str:
    by %= len(urls)
    return ",".join(urls[by:] + urls[:by])


def first_node_for_all(urls: list[str]) -> list[str]:
    """Every process starts on the first node (the other two in either order): when it
    goes, all of them must move, or nothing is published until it is back."""
    return [",".join(urls), ",".join([urls[0], *reversed(urls[1:])])] * 2


def spread(urls: list[str]) -> list[str]:
    """Each process starts on another node."""
    return [rotated(urls, n) for n in range(4)]


@asynccontextmanager
async def taskbox_on(
    processes: Cluster, pool: asyncpg.Pool, orders: list[str]
) -> AsyncIterator[tuple[Load, PublishWatch]]:
    """api, two relays and two consumers (AMQP_URL of each from ``orders``), the load
    and the publish watch, running for the body of the ``with``. The first relay
    declares the queues, so the task queue's leader is its first node."""
    _, base_url = await processes.api()
    for order in orders[:2]:
        await processes.relay(AMQP_URL=order, RELAY_PUBLISH_TIMEOUT="5")
    for order in orders[2:]:
        await processes.consumer(AMQP_URL=order)
    load = Load(base_url, RATE)
    watch = PublishWatch(pool)
    running = [asyncio.create_task(load.run()), asyncio.create_task(watch.run())]
    try:
        yield load, watch
    finally:
        load.stop()
        watch.stop()
        await asyncio.gather(*running)


async def done_count(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM tasks WHERE status = 'DONE'")
    return count


async def carries_on_without(
    node: RabbitNode, down: float, watch: PublishWatch, pool: asyncpg.Pool
) -> str:
    """With ``node`` down since ``down``: tasks are published and finished again (their
    clients moved to another node) within RESUME_BOUND. Says how long publishing
    stopped: the longest time without a publish from ``down`` on, the node still down
    (the time publishing took to resume)."""
    # A batch confirmed just before the fault may commit just after it: only a publish
    # a second later proves a relay publishes again.
    await watch.resumed(after=down + 1.0, within=RESUME_BOUND)
    before = await done_count(pool)
    await wait_until(
        lambda: done_count(pool),
        lambda n: n > before,
        f"tasks finished without {node.name}",
        RESUME_BOUND,
    )
    gap, _ = watch.stall_after(down, time.monotonic())
    return f"publishing stopped for at most {gap:.2f}s while it was down"


async def under_load(
    processes: Cluster,
    pool: asyncpg.Pool,
    orders: list[str],
    fault: Callable[[PublishWatch], Awaitable[None]],
    name: str,
    report: Callable[[str], None],
) -> None:
    async with taskbox_on(processes, pool, orders) as (load, watch):
        await asyncio.sleep(WARMUP)
        struck = time.monotonic()
        await fault(watch)
        over = time.monotonic()
        await asyncio.sleep(SETTLE)
    stall, _ = watch.stall_after(struck, time.monotonic())
    ids = load.acknowledged
    await wait_until(
        lambda: all_terminal(pool, ids),
        lambda left: left == 0,
        f"every one of {len(ids)} tasks terminal",
        DRAIN,
        every=0.5,
        context=lambda: processes.logs(60),
    )
    result = await outcome(pool, ids)
    report(
        f"{name}: {result.line()} fault_took={over - struck:.1f}s longest_publish_gap={stall:.2f}s"
    )
    assert not load.refused, load.refused[:5]
    assert result.clean, (
        result.lost[:5],
        result.stuck,
        result.committed_twice,
        result.stale_writes,
    )
    assert result.done == len(ids)
    assert stall < STALL_BOUND


@pytest.mark.timeout(300)
async def test_the_queue_leaders_node_is_killed_and_restarted(
    processes: Cluster,
    rabbit: RabbitCluster,
    broker_settings: BrokerSettings,
    audited: asyncpg.Pool,
    cluster_report: Callable[[str], None],
) -> None:
    queue = broker_settings.queue_name
    seen: list[str] = []

    async def kill_the_leader(watch: PublishWatch) -> None:
        leader = await rabbit.leader(queue)
        # Every process is on the leader's node: its death moves them all.
        assert leader is rabbit.nodes[0], f"the leader is {leader.name}, not the first node"
        down = time.monotonic()
        await rabbit.kill(leader)
        resumed = await carries_on_without(leader, down, watch, audited)
        seen.append(
            f"leader kill: SIGKILLed {leader.name}; {resumed}; "
            f"new leader {(await rabbit.leader(queue)).name}"
        )
        await rabbit.restart(leader)

    await under_load(
        processes,
        audited,
        first_node_for_all(rabbit.urls),
        kill_the_leader,
        "leader kill",
        cluster_report,
    )
    for line in seen:
        cluster_report(line)


@pytest.mark.timeout(300)
async def test_every_node_restarted_in_turn(
    processes: Cluster,
    rabbit: RabbitCluster,
    broker_settings: BrokerSettings,
    audited: asyncpg.Pool,
    cluster_report: Callable[[str], None],
) -> None:
    seen: list[str] = []

    async def rolling_restart(watch: PublishWatch) -> None:
        for node in rabbit.nodes:
            down = time.monotonic()
            await rabbit.stop(node)
            resumed = await carries_on_without(node, down, watch, audited)
            seen.append(f"rolling restart: {node.name} stopped; {resumed}")
            await rabbit.restart(node)  # back in the cluster before the next one goes

    await under_load(
        processes, audited, spread(rabbit.urls), rolling_restart, "rolling restart", cluster_report
    )
    for line in seen:
        cluster_report(line)


@pytest.mark.timeout(300)
async def test_the_queue_leaders_node_is_cut_off_from_the_others(
    processes: Cluster,
    rabbit: RabbitCluster,
    broker_settings: BrokerSettings,
    audited: asyncpg.Pool,
    cluster_report: Callable[[str], None],
) -> None:
    queue = broker_settings.queue_name
    seen: list[str] = []

    async def partition_the_leader(watch: PublishWatch) -> None:
        leader = await rabbit.leader(queue)
        assert leader is rabbit.nodes[0], f"the leader is {leader.name}, not the first node"
        down = time.monotonic()
        # Its clients stay connected until pause_minority stops it: they must move.
        await rabbit.partition(leader)
        # pause_minority: alone, the node stops its listener (so it really was cut off).
        await wait_until(
            lambda: rabbit.accepts(leader),
            lambda accepts: not accepts,
            f"{leader.name} to pause",
            RESUME_BOUND,
            every=0.5,
        )
        refused = time.monotonic() - down  # an upper bound: each poll may wait 5 s
        resumed = await carries_on_without(leader, down, watch, audited)
        seen.append(
            f"partition: cut {leader.name} off, refused clients {refused:.1f}s later; {resumed}; "
            f"new leader {(await rabbit.leader(queue)).name}"
        )
        await rabbit.heal(leader)

    await under_load(
        processes,
        audited,
        first_node_for_all(rabbit.urls),
        partition_the_leader,
        "partition",
        cluster_report,
    )
    for line in seen:
        cluster_report(line)
