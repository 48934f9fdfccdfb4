"""Deterministic fault windows that tests/integration does not already cover.

Covered there, not repeated here: relay killed between publish and commit
(test_relay: test_crash_between_publish_and_commit_duplicates_and_never_loses,
test_relay_killed_mid_drain_loses_nothing), consumer killed between commit and ack
(test_consumer: test_a_kill_between_commit_and_ack_redelivers_and_the_duplicate_is_dropped),
consumer killed mid-handler (test_a_surviving_consumer_rescues_the_tasks_of_a_killed_one,
test_a_crash_exhausting_the_attempts_fails_the_task_when_a_consumer_restarts_later),
a lost notification picked up by the poll (test_poll_alone_publishes_when_listen_is_off,
test_listen_connection_is_reestablished_after_its_backend_is_terminated), and the relay
meeting a database that refuses connections
(test_relay_survives_the_database_refusing_connections_for_a_moment).

Here: outages and connection cuts through the tests' TCP proxy (RabbitMQ away from the
relay and consumer, Postgres away from the api and from a consumer mid-run, an AMQP
cut mid-run, relay and consumer stopped while RabbitMQ is away, the reply to a claim
lost), the API's 503 and its recovery, the bound on
a lost worker's task's rescue, and the exit status 3 of a process whose background
loop died.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from taskbox.broker.settings import BrokerSettings
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, create_task
from taskbox.runtime.lifecycle import EXIT_LOOP_DIED
from tests.conftest import ROOT
from tests.faults.cluster import (
    FAST_CONSUMER,
    TERMINAL,
    TERMINAL_WRITTEN_TWICE,
    Cluster,
    running,
    stop_cleanly,
    wait_until,
)
from tests.faults.proxy import TcpProxy
from tests.integration.helpers_broker import queue_depth
from tests.integration.processes import ServiceProcess

TASKS = "/api/v1/tasks"


async def post_tasks(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> list[uuid.UUID]:
    """POST each body; every one must be answered 201."""
    ids = []
    for body in bodies:
        response = await client.post(TASKS, json=body)
        assert response.status_code == 201, response.text
        ids.append(uuid.UUID(response.json()["id"]))
    return ids


async def statuses(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> Counter[str]:
    rows = await pool.fetch("SELECT status FROM tasks WHERE id = ANY($1::uuid[])", ids)
    return Counter(row["status"] for row in rows)


async def redeliveries_dropped(consumer: ServiceProcess, count: int, cluster: Cluster) -> None:
    """Wait until ``consumer`` (logging at DEBUG) has dropped ``count`` redeliveries of
    tasks already DONE."""

    async def dropped() -> int:
        return consumer.output.count("dropping duplicate delivery; task is DONE")

    await wait_until(
        dropped,
        lambda n: n >= count,
        f"the {count} redeliveries dropped",
        within=20,
        context=cluster.logs,
    )


async def all_done(pool: asyncpg.Pool, ids: list[uuid.UUID], cluster: Cluster) -> None:
    await wait_until(
        lambda: statuses(pool, ids),
        lambda seen: seen == {"DONE": len(ids)},
        f"{len(ids)} tasks DONE",
        within=30,
        context=cluster.logs,
    )


async def assert_each_outcome_written_once(pool: asyncpg.Pool, ids: list[uuid.UUID]) -> None:
    twice = await pool.fetch(TERMINAL_WRITTEN_TWICE)
    assert twice == [], [dict(row) for row in twice]
    rows = await pool.fetch(
        "SELECT task_id, count(*) AS n FROM fault_audit"
        " WHERE new_status = ANY($1::text[]) GROUP BY task_id",
        list(TERMINAL),
    )
    assert {row["task_id"]: row["n"] for row in rows} == dict.fromkeys(ids, 1)


async def assert_queues_empty(settings: BrokerSettings) -> None:
    """Call once every consumer has exited: an unacked message would be ready again."""
    assert await queue_depth(settings) == 0
    assert await queue_depth(settings, settings.dead_letter_queue) == 0


# -- RabbitMQ away: the API goes on, the outbox grows, then drains -----------------------


async def test_api_accepts_tasks_while_rabbitmq_is_unreachable_and_the_outbox_drains_after(
    audited: asyncpg.Pool,
    broker_settings: BrokerSettings,
    amqp_proxy: TcpProxy,
    cluster: Cluster,
) -> None:
    pool = audited
    through_proxy = {"AMQP_URL": amqp_proxy.url(broker_settings.amqp_url)}
    _, base_url = await cluster.api()
    relay = await cluster.relay(**through_proxy)
    consumer = await cluster.consumer(**through_proxy)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        before = await post_tasks(client, [{"type": "echo", "payload": {"n": i}} for i in range(5)])
        await all_done(pool, before, cluster)

        assert await amqp_proxy.pause() >= 2, "relay and consumer were not connected"
        during = await post_tasks(
            client, [{"type": "echo", "payload": {"n": i}} for i in range(5, 55)]
        )
        # The relay tries (and fails) to publish them; nothing reaches the queue.
        await relay.wait_for("drain failed", timeout=10)
        unpublished = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        assert await pool.fetchval(unpublished) == len(during)
        assert await statuses(pool, during) == {"NEW": len(during)}
        assert running(relay) and running(consumer), cluster.logs()

        await amqp_proxy.resume()
        await all_done(pool, during, cluster)
    assert await pool.fetchval(unpublished) == 0
    # An outage is not the rows' fault: no row is charged an attempt or an error for it.
    charged = await pool.fetch(
        "SELECT id, publish_attempts, last_error FROM outbox"
        " WHERE publish_attempts <> 1 OR last_error IS NOT NULL"
    )
    assert charged == [], [dict(row) for row in charged]
    await assert_each_outcome_written_once(pool, before + during)
    await stop_cleanly(consumer, relay)
    await assert_queues_empty(broker_settings)


# -- Postgres away from the API: 503, never 500, and recovery without a restart ----------


async def test_api_answers_503_while_postgres_is_unreachable_and_recovers_by_itself(
    db_settings: DatabaseSettings, pg_proxy: TcpProxy, cluster: Cluster
) -> None:
    api, base_url = await cluster.api(DATABASE_URL=pg_proxy.url(db_settings.database_url))
    async with httpx.AsyncClient(base_url=base_url, timeout=15) as client:
        (first,) = await post_tasks(client, [{"type": "echo", "payload": {"before": True}}])

        # A cut under a burst of requests: each is answered 201 or 503, never 500.
        async def create(i: int) -> int:
            response = await client.post(TASKS, json={"type": "echo", "payload": {"i": i}})
            return response.status_code

        burst = [asyncio.create_task(create(i)) for i in range(60)]
        await asyncio.sleep(0.05)
        assert pg_proxy.cut() >= 1
        codes = Counter(await asyncio.gather(*burst))
        assert set(codes) <= {201, 503}, codes

        await pg_proxy.pause()
        requests = [
            ("POST", TASKS, {"type": "echo", "payload": {}}),
            ("GET", f"{TASKS}/{first}", None),
            ("GET", f"{TASKS}/{first}/status", None),
            ("GET", TASKS, None),
            ("DELETE", f"{TASKS}/{first}", None),
        ]
        for method, path, body in requests:
            response = await client.request(method, path, json=body)
            assert response.status_code == 503, (method, path, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"] == "1"
            problem = response.json()
            assert problem["status"] == 503
            assert problem["detail"] == "the task store is unavailable; retry shortly"
            assert str(pg_proxy.port) not in response.text
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/healthz")).status_code == 200

        await pg_proxy.resume()

        async def create_once() -> int:
            response = await client.post(TASKS, json={"type": "echo", "payload": {"after": 1}})
            return response.status_code

        await wait_until(create_once, lambda code: code == 201, "a 201 after the outage", 15)
        assert (await client.get(f"{TASKS}/{first}")).json()["payload"] == {"before": True}
        assert (await client.get("/readyz")).status_code == 200
    assert running(api)
    assert "unhandled error" not in api.output, api.output
    assert "database unavailable" in api.output


# -- a consumer whose Postgres connections are cut, then refused, mid-run ----------------


async def test_consumer_rides_out_postgres_cuts_mid_run_and_commits_each_result_once(
    audited: asyncpg.Pool,
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    pg_proxy: TcpProxy,
    cluster: Cluster,
) -> None:
    pool = audited
    relay = await cluster.relay()
    # A stale-after far beyond the outage: this test is about the connection, not rescue.
    consumer = await cluster.consumer(
        DATABASE_URL=pg_proxy.url(db_settings.database_url), TASK_STALE_AFTER="20"
    )
    ids = [
        (await create_task(pool, NewTask("sleep", {"seconds": 3}, 0, 3)))["id"] for _ in range(20)
    ]
    await wait_until(
        lambda: statuses(pool, ids),
        lambda seen: seen == {"PROCESSING": 20},
        "20 tasks running",
        within=15,
        context=cluster.logs,
    )
    # 1. Every connection drops while the handlers run; heartbeats must reconnect.
    cut_at = await pool.fetchval("SELECT now()")
    assert pg_proxy.cut() >= 1
    await wait_until(
        lambda: pool.fetchval(
            "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[]) AND heartbeat_at > $2",
            ids,
            cut_at,
        ),
        lambda n: n == 20,
        "a heartbeat after the cut",
        within=5,
        context=cluster.logs,
    )
    # 2. Postgres becomes unreachable before the handlers finish: the completion fails
    # and is retried until the server is back.
    await pg_proxy.pause()
    await consumer.wait_for("completion failed", timeout=10)
    assert await statuses(pool, ids) == {"PROCESSING": 20}
    await pg_proxy.resume()

    await all_done(pool, ids, cluster)
    rows = await pool.fetch("SELECT attempts, result FROM tasks WHERE id = ANY($1::uuid[])", ids)
    assert {(row["attempts"], row["result"]["slept"]) for row in rows} == {(1, 3.0)}
    await assert_each_outcome_written_once(pool, ids)
    await stop_cleanly(consumer, relay)
    await assert_queues_empty(broker_settings)


# -- a consumer whose AMQP connection is cut mid-run --------------------------------------


async def test_consumer_rides_out_an_amqp_cut_mid_run_and_drops_the_redeliveries(
    audited: asyncpg.Pool,
    broker_settings: BrokerSettings,
    amqp_proxy: TcpProxy,
    cluster: Cluster,
) -> None:
    pool = audited
    relay = await cluster.relay()
    consumer = await cluster.consumer(
        AMQP_URL=amqp_proxy.url(broker_settings.amqp_url), LOG_LEVEL="DEBUG"
    )
    _, base_url = await cluster.api()
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        ids = await post_tasks(client, [{"type": "sleep", "payload": {"seconds": 2}}] * 10)
        await wait_until(
            lambda: statuses(pool, ids),
            lambda seen: seen == {"PROCESSING": 10},
            "10 tasks running",
            within=15,
            context=cluster.logs,
        )
        # The channel goes with the connection: the broker requeues the 10 unacked
        # messages, the handlers finish and commit, their acks have nowhere to go.
        assert amqp_proxy.cut() == 1
        await all_done(pool, ids, cluster)

        # The robust connection comes back and gets the 10 messages again: each claim
        # finds its task DONE and drops the duplicate.
        await redeliveries_dropped(consumer, 10, cluster)
        # And the consumer still takes new work.
        after = await post_tasks(client, [{"type": "echo", "payload": {"after": "cut"}}])
        await all_done(pool, after, cluster)
    rows = await pool.fetch("SELECT attempts FROM tasks WHERE id = ANY($1::uuid[])", ids)
    assert {row["attempts"] for row in rows} == {1}
    await assert_each_outcome_written_once(pool, ids + after)
    await stop_cleanly(consumer, relay)
    await assert_queues_empty(broker_settings)


async def test_relay_and_consumer_stopped_while_their_amqp_link_is_down_exit_0_and_lose_nothing(
    audited: asyncpg.Pool,
    broker_settings: BrokerSettings,
    amqp_proxy: TcpProxy,
    cluster: Cluster,
) -> None:
    """SIGTERM while the robust connection is reconnecting: the basic.cancel meets a
    closed channel (aiormq's ChannelInvalidStateError, not an AMQPError). The consumer
    must still let its running tasks finish, commit them and exit 0; a chaos run caught
    it exiting 1 here. The relay, between connections too, must stop as cleanly."""
    pool = audited
    through_proxy = {"AMQP_URL": amqp_proxy.url(broker_settings.amqp_url)}
    relay = await cluster.relay(**through_proxy)
    consumer = await cluster.consumer(**through_proxy)
    _, base_url = await cluster.api()
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        ids = await post_tasks(client, [{"type": "sleep", "payload": {"seconds": 2}}] * 5)
        await wait_until(
            lambda: statuses(pool, ids),
            lambda seen: seen == {"PROCESSING": 5},
            "5 tasks running",
            within=15,
            context=cluster.logs,
        )
        # Cut the links and keep them down: both are between connections.
        assert await amqp_proxy.pause() == 2
        await asyncio.sleep(0.2)
        await stop_cleanly(consumer, relay)
        assert "could not cancel the AMQP consumer" in consumer.output
        # The handlers ran to the end within the grace period and committed.
        assert await statuses(pool, ids) == {"DONE": 5}
        # The broker took the unacked messages back; a fresh consumer drops them as
        # duplicates of finished tasks.
        await amqp_proxy.resume()
        successor = await cluster.consumer(LOG_LEVEL="DEBUG")
        await redeliveries_dropped(successor, 5, cluster)
    await assert_each_outcome_written_once(pool, ids)
    await stop_cleanly(successor)
    await assert_queues_empty(broker_settings)


# -- a background loop dies: exit status 3 ------------------------------------------------


async def test_consumer_exits_3_when_its_rescue_loop_dies(
    pool: asyncpg.Pool, cluster: Cluster
) -> None:
    # From outside: the schema changes under the consumer (a bad migration), so its
    # stuck-task sweep meets an error that no retry can fix. The idle consumer runs no
    # other statement, so the rescue loop is the one that dies.
    consumer = await cluster.consumer()
    await pool.execute("ALTER TABLE tasks RENAME TO tasks_moved")
    assert await consumer.wait(timeout=10) == EXIT_LOOP_DIED, consumer.output
    assert "background loop 'rescue' stopped" in consumer.output
    assert 'relation "tasks" does not exist' in consumer.output


# The relay's only background loop is its LISTEN connection, and nothing a server can do
# kills it: it retries every database error there is (tests/integration/test_relay.py
# terminates its backend and makes the database refuse connections). So the loop is
# broken from inside, by a sitecustomize the test puts on PYTHONPATH: the process is the
# real ``python -m relay``, whose listener raises once it receives SIGUSR1.
SITECUSTOMIZE = "import tests.faults.sabotage\n"


async def test_relay_exits_3_when_its_listen_loop_dies(
    pool: asyncpg.Pool, cluster: Cluster, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    relay = await cluster.relay(PYTHONPATH=f"{tmp_path}:{ROOT}")
    # The loop is up (and listens for SIGUSR1) once its LISTEN connection is there.
    await wait_until(
        lambda: pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database()"
            " AND (query LIKE 'LISTEN %' OR query = 'SELECT pg_notify($1, $2)')"
        ),
        lambda n: n >= 1,
        "the relay's LISTEN connection",
        within=10,
        context=cluster.logs,
    )
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGUSR1)
    assert await relay.wait(timeout=10) == EXIT_LOOP_DIED, relay.output
    assert "background loop 'listener' stopped" in relay.output
    assert "LISTEN loop broken on purpose" in relay.output


# -- the reply to a consumer's claim is lost ----------------------------------------------


async def test_a_claim_whose_reply_was_lost_still_runs_the_task(
    audited: asyncpg.Pool,
    db_settings: DatabaseSettings,
    broker_settings: BrokerSettings,
    pg_proxy: TcpProxy,
    cluster: Cluster,
) -> None:
    # The claim commits, then the connection drops before its reply arrives (a network
    # blip, a Postgres connection cut): the consumer retries the claim. The task is
    # PROCESSING under this consumer's own worker id by then; it must still run, once.
    pool = audited
    consumer = await cluster.consumer(
        DATABASE_URL=pg_proxy.url(db_settings.database_url), LOG_LEVEL="DEBUG"
    )
    task_id = (await create_task(pool, NewTask("echo", {"reply": "lost"}, 0, 1)))["id"]
    # The claim's Bind message carries the task id as 16 raw bytes (uuid[] in binary).
    pg_proxy.drop_reply_to(task_id.bytes)
    relay = await cluster.relay()
    await asyncio.wait_for(pg_proxy.reply_dropped.wait(), timeout=10)

    row = await wait_until(
        lambda: pool.fetchrow(
            "SELECT status, attempts, error, result FROM tasks WHERE id = $1", task_id
        ),
        lambda row: row["status"] in TERMINAL,
        "the task to end",
        within=15,
        context=cluster.logs,
    )
    audit = await pool.fetch(
        "SELECT old_status, new_status, source FROM fault_audit WHERE task_id = $1 ORDER BY seq",
        task_id,
    )
    assert (row["status"], row["result"]) == ("DONE", {"reply": "lost"}), (
        f"max_attempts=1, the claim's reply was lost and the task ended {dict(row)}; "
        f"transitions {[tuple(a) for a in audit]}\n{consumer.output}"
    )
    await stop_cleanly(consumer, relay)
    await assert_queues_empty(broker_settings)


# -- how long a lost worker's task waits ---------------------------------------------------


async def test_a_killed_consumers_task_is_rescued_within_stale_after_plus_rescue_interval(
    audited: asyncpg.Pool, broker_settings: BrokerSettings, cluster: Cluster
) -> None:
    # The README promises the bound; tests/integration only shows that the rescue happens.
    pool = audited
    stale_after = float(FAST_CONSUMER["TASK_STALE_AFTER"])
    rescue_interval = float(FAST_CONSUMER["RESCUE_INTERVAL"])
    heartbeat = float(FAST_CONSUMER["HEARTBEAT_INTERVAL"])
    relay = await cluster.relay()
    victim = await cluster.consumer()
    task_id = (await create_task(pool, NewTask("sleep", {"seconds": 4}, 0, 3)))["id"]
    row = await wait_until(
        lambda: pool.fetchrow("SELECT status, worker_id FROM tasks WHERE id = $1", task_id),
        lambda row: row["status"] == "PROCESSING",
        "the task to run",
        within=10,
        context=cluster.logs,
    )
    assert victim.proc is not None
    assert f":{victim.proc.pid}:" in row["worker_id"]
    survivor = await cluster.consumer()
    victim.kill()
    await victim.wait(timeout=10)
    killed_at = await pool.fetchval("SELECT clock_timestamp()")

    rescued_at = await wait_until(
        lambda: pool.fetchval(
            "SELECT at FROM fault_audit WHERE task_id = $1 AND source = 'rescue'", task_id
        ),
        lambda at: at is not None,
        "the rescue",
        within=stale_after + rescue_interval + 10,
        context=cluster.logs,
    )
    waited = (rescued_at - killed_at).total_seconds()
    # Never before the heartbeat is stale (it was last written up to one interval before
    # the kill), never later than one sweep after that.
    assert stale_after - heartbeat - 0.2 <= waited <= stale_after + rescue_interval + 1.0, waited
    done = await wait_until(
        lambda: pool.fetchrow("SELECT status, attempts FROM tasks WHERE id = $1", task_id),
        lambda row: row["status"] in TERMINAL,
        "the rescued task to end",
        within=15,
        context=cluster.logs,
    )
    assert (done["status"], done["attempts"]) == ("DONE", 2)
    await stop_cleanly(survivor, relay)
    await assert_queues_empty(broker_settings)
