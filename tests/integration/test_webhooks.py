"""Webhooks against the real Postgres and a local receiver: the outbox row commits with
the outcome, the delivery worker signs, retries, fails and replays, the API manages
subscriptions and refuses internal destinations."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import standardwebhooks

from taskbox.api.settings import ApiSettings
from taskbox.db import webhooks as store
from taskbox.db.settings import DatabaseSettings
from taskbox.db.tasks import NewTask, cancel_task, create_task
from taskbox.relay.listener import OutboxListener
from taskbox.relay.metrics import RelayMetrics
from taskbox.relay.settings import RelaySettings
from taskbox.relay.webhooks import DeliveryWorker
from taskbox.webhooks import WEBHOOK_CHANNEL, new_secret
from tests.integration.conftest import app_client_for
from tests.integration.processes import ServiceProcess, free_port
from tests.integration.webhook_receiver import (
    Answer,
    Received,
    Receiver,
    always,
    failing_first,
)

LOCAL = ["127.0.0.1"]


def relay_settings(db_settings: DatabaseSettings, **overrides: Any) -> RelaySettings:
    values: dict[str, Any] = {
        "database_url": db_settings.database_url,
        "outbox_channel": db_settings.outbox_channel,
        "webhook_allowed_hosts": LOCAL,
        "webhook_retry_base_delay": 0.05,
        "webhook_retry_max_delay": 0.2,
        "webhook_poll_interval": 0.1,
        "webhook_timeout": 2.0,
        **overrides,
    }
    return RelaySettings(_env_file=None, **values)


@contextlib.asynccontextmanager
async def running_worker(
    pool: asyncpg.Pool, settings: RelaySettings
) -> AsyncIterator[DeliveryWorker]:
    worker = DeliveryWorker(pool, settings, asyncio.Event(), RelayMetrics())
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def subscribe(
    pool: asyncpg.Pool, url: str, events: tuple[str, ...] = ("task.done",), **filters: Any
) -> tuple[uuid.UUID, str]:
    secret = new_secret()
    row = await store.create_webhook(pool, store.Subscription(url, events, **filters), secret)
    return row["id"], secret


async def finish(pool: asyncpg.Pool, status: str = "DONE", **task: Any) -> uuid.UUID:
    """A task, moved to ``status`` as the consumer's finish does (one UPDATE)."""
    fields = {"type": "echo", "payload": {"n": 1}, "priority": 0, "max_attempts": 3, **task}
    row = await create_task(pool, NewTask(**fields))
    await pool.execute(
        "UPDATE tasks SET status = $2, result = '{\"ok\": true}', finished_at = now(),"
        " attempts = 1 WHERE id = $1",
        row["id"],
        status,
    )
    task_id: uuid.UUID = row["id"]
    return task_id


async def deliveries_of(pool: asyncpg.Pool, task_id: uuid.UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM webhook_deliveries WHERE task_id = $1 ORDER BY created_at", task_id
    )
    return rows


async def wait_status(
    pool: asyncpg.Pool, delivery_id: uuid.UUID, status: str, within: float = 10.0
) -> asyncpg.Record:
    deadline = time.monotonic() + within
    row = None
    while time.monotonic() < deadline:
        row = await pool.fetchrow("SELECT * FROM webhook_deliveries WHERE id = $1", delivery_id)
        if row is not None and row["status"] == status:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"delivery not {status} within {within}s: {row}")


async def attempts_of(pool: asyncpg.Pool, delivery_id: uuid.UUID) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM webhook_attempts WHERE delivery_id = $1 ORDER BY id", delivery_id
    )
    return rows


def verified(secret: str, request: Received) -> Any:
    """The event as the Standard Webhooks library verifies it (raises when it does not)."""
    return standardwebhooks.Webhook(secret).verify(request.body, request.headers)


# --- the outbox row and the outcome commit together ---------------------------------


async def test_the_delivery_row_commits_with_the_outcome_and_not_without_it(
    pool: asyncpg.Pool,
) -> None:
    webhook_id, _ = await subscribe(pool, "http://127.0.0.1:9/hook", ("task.done",))
    task = await create_task(pool, NewTask("echo", {"n": 1}, 0, 3))
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("UPDATE tasks SET status = 'DONE' WHERE id = $1", task["id"])
        inside = await conn.fetch(
            "SELECT webhook_id, event, body FROM webhook_deliveries WHERE task_id = $1",
            task["id"],
        )
        # Another session sees neither the outcome nor its delivery before the commit.
        assert await deliveries_of(pool, task["id"]) == []
        await transaction.rollback()
    assert [(r["webhook_id"], r["event"]) for r in inside] == [(webhook_id, "task.done")]
    assert inside[0]["body"]["data"]["id"] == str(task["id"])
    # rolled back: no outcome, and no delivery either
    assert await deliveries_of(pool, task["id"]) == []
    assert await pool.fetchval("SELECT status FROM tasks WHERE id = $1", task["id"]) == "NEW"

    await pool.execute("UPDATE tasks SET status = 'DONE' WHERE id = $1", task["id"])
    assert len(await deliveries_of(pool, task["id"])) == 1


async def test_each_terminal_path_enqueues_matching_subscriptions_only(
    pool: asyncpg.Pool,
) -> None:
    everything, _ = await subscribe(
        pool, "http://127.0.0.1:9/all", ("task.done", "task.failed", "task.cancelled")
    )
    sha_only, _ = await subscribe(
        pool, "http://127.0.0.1:9/sha", ("task.done",), task_types=["sha256"]
    )
    other_queue, _ = await subscribe(pool, "http://127.0.0.1:9/q", ("task.done",), queues=["other"])
    await subscribe(pool, "http://127.0.0.1:9/off", ("task.done",), enabled=False)

    done = await finish(pool, "DONE")
    failed = await finish(pool, "FAILED")
    sha = await finish(pool, "DONE", type="sha256", payload={"text": "x"})
    created = await create_task(pool, NewTask("echo", {}, 0, 3))
    await cancel_task(pool, created["id"])  # cancel_task() of migration 0004

    def targets(rows: list[asyncpg.Record]) -> set[tuple[uuid.UUID, str]]:
        return {(r["webhook_id"], r["event"]) for r in rows}

    assert targets(await deliveries_of(pool, done)) == {(everything, "task.done")}
    assert targets(await deliveries_of(pool, failed)) == {(everything, "task.failed")}
    assert targets(await deliveries_of(pool, sha)) == {
        (everything, "task.done"),
        (sha_only, "task.done"),
    }
    assert targets(await deliveries_of(pool, created["id"])) == {(everything, "task.cancelled")}
    assert other_queue not in {
        r["webhook_id"] for r in await pool.fetch("SELECT webhook_id FROM webhook_deliveries")
    }
    # an update that is no move to a terminal status enqueues nothing more
    await pool.execute("UPDATE tasks SET status = 'DONE', updated_at = now() WHERE id = $1", done)
    assert len(await deliveries_of(pool, done)) == 1


# --- the delivery worker -----------------------------------------------------------


async def test_delivered_at_least_once_signed_retried_with_backoff_and_recorded(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    async with Receiver(failing_first(2)) as receiver:
        _, secret = await subscribe(pool, f"{receiver.url}/hooks?x=1")
        task_id = await finish(pool)
        (delivery,) = await deliveries_of(pool, task_id)
        # a backoff well above the worker's poll interval (0.1 s), so that spacing shows
        settings = relay_settings(
            db_settings, webhook_retry_base_delay=0.3, webhook_retry_max_delay=1.0
        )
        async with running_worker(pool, settings):
            row = await wait_status(pool, delivery["id"], "delivered")
        requests = receiver.requests
    assert len(requests) == 3
    assert {r.path for r in requests} == {"/hooks?x=1"}
    # the same webhook-id on every retry: receivers drop duplicates by it
    assert {r.headers["webhook-id"] for r in requests} == {str(delivery["id"])}
    for request in requests:
        event = verified(secret, request)
        assert event["type"] == "task.done"
        assert event["data"]["id"] == str(task_id)
        assert event["data"]["result"] == {"ok": True}
    attempts = await attempts_of(pool, delivery["id"])
    assert [(a["attempt"], a["status_code"]) for a in attempts] == [(1, 500), (2, 500), (3, 200)]
    assert attempts[0]["error"] == "answered 500" and attempts[0]["response_body"] == "boom"
    assert all(a["latency_ms"] >= 0 for a in attempts)
    assert row["attempts"] == 3 and row["delivered_at"] is not None
    # backoff: the retries were spaced, not sent back to back
    gaps = [(b["at"] - a["at"]).total_seconds() for a, b in itertools.pairwise(attempts)]
    # jitter draws from the top half: at least 0.15 s, then at least 0.3 s
    assert gaps[0] >= 0.15 and gaps[1] >= 0.3, gaps


async def test_failed_after_the_limit_then_replayed_over_the_api(
    pool: asyncpg.Pool, db_settings: DatabaseSettings, api_settings: ApiSettings
) -> None:
    async with Receiver(always(Answer(503, b"x" * 5000))) as receiver:
        webhook_id, secret = await subscribe(pool, receiver.url)
        task_id = await finish(pool)
        (delivery,) = await deliveries_of(pool, task_id)
        settings = relay_settings(db_settings, webhook_max_attempts=3)
        async with running_worker(pool, settings):
            await wait_status(pool, delivery["id"], "failed")
            attempts = await attempts_of(pool, delivery["id"])
            assert [a["status_code"] for a in attempts] == [503, 503, 503]
            # only a prefix of the answer is kept
            assert all(len(a["response_body"].encode()) == 1024 for a in attempts)
            await asyncio.sleep(0.3)
            assert len(receiver.requests) == 3  # no fourth attempt

            receiver.plan = always(Answer(204, b""))
            async with app_client_for(api_settings) as client:
                failed = await client.get(
                    f"/api/v1/webhooks/{webhook_id}/deliveries", params={"status": "failed"}
                )
                assert [d["id"] for d in failed.json()["items"]] == [str(delivery["id"])]
                replayed = await client.post(f"/api/v1/webhook-deliveries/{delivery['id']}/replay")
                assert replayed.status_code == 200, replayed.text
                assert replayed.json()["status"] == "pending"
                await wait_status(pool, delivery["id"], "delivered")
                again = await client.post(f"/api/v1/webhook-deliveries/{delivery['id']}/replay")
                assert again.status_code == 409, again.text
                assert "only a failed delivery" in again.json()["detail"]
                detail = (await client.get(f"/api/v1/webhook-deliveries/{delivery['id']}")).json()
        assert [a["status_code"] for a in detail["history"]] == [503, 503, 503, 204]
        assert [a["attempt"] for a in detail["history"]] == [1, 2, 3, 1]
        assert detail["status"] == "delivered" and detail["body"]["type"] == "task.done"
        verified(secret, receiver.requests[-1])


async def test_a_receiver_that_hangs_times_out_and_a_later_attempt_delivers(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    async with Receiver(failing_first(1, Answer(200, delay=3.0))) as receiver:
        await subscribe(pool, receiver.url)
        (delivery,) = await deliveries_of(pool, await finish(pool))
        async with running_worker(pool, relay_settings(db_settings, webhook_timeout=0.5)):
            await wait_status(pool, delivery["id"], "delivered")
    first, second = await attempts_of(pool, delivery["id"])
    assert first["status_code"] is None and "no complete answer within 0.5s" in first["error"]
    assert second["status_code"] == 200


async def test_a_redirect_is_not_followed(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    redirect = Answer(307, b"", {"location": "http://169.254.169.254/latest/meta-data"})
    async with Receiver(always(redirect)) as receiver:
        await subscribe(pool, receiver.url)
        (delivery,) = await deliveries_of(pool, await finish(pool))
        settings = relay_settings(db_settings, webhook_max_attempts=1)
        async with running_worker(pool, settings):
            await wait_status(pool, delivery["id"], "failed")
        assert len(receiver.requests) == 1
    (attempt,) = await attempts_of(pool, delivery["id"])
    assert attempt["status_code"] == 307
    assert "redirects are not followed" in attempt["error"]


async def test_an_internal_destination_is_refused_at_delivery_time(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    """A row whose host resolves to loopback (allowed when subscribed, or changed in
    DNS since) is not sent when the worker's allow-list does not name it."""
    async with Receiver() as receiver:
        await subscribe(pool, f"http://localhost:{receiver.port}/")
        (delivery,) = await deliveries_of(pool, await finish(pool))
        settings = relay_settings(db_settings, webhook_allowed_hosts=[], webhook_max_attempts=1)
        async with running_worker(pool, settings):
            await wait_status(pool, delivery["id"], "failed")
        assert receiver.requests == []
    (attempt,) = await attempts_of(pool, delivery["id"])
    assert "'localhost' resolves to an address webhooks may not reach" in attempt["error"]
    assert "127.0.0.1" not in attempt["error"]
    assert "WEBHOOK_ALLOWED_HOSTS" in attempt["error"]


async def test_after_a_rotation_both_secrets_sign_until_the_grace_ends(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    async with Receiver() as receiver:
        webhook_id, old = await subscribe(pool, receiver.url)
        new = new_secret()
        await store.rotate_secret(pool, webhook_id, new, 3600)
        await finish(pool)
        async with running_worker(pool, relay_settings(db_settings)):
            (request,) = await receiver.wait_for(1)
            assert len(request.headers["webhook-signature"].split(" ")) == 2
            verified(old, request)
            verified(new, request)
            # the grace ran out: only the new secret signs
            await store.rotate_secret(pool, webhook_id, new_secret(), 0)
            newest = await pool.fetchval("SELECT secret FROM webhooks WHERE id = $1", webhook_id)
            await finish(pool)
            (_, second) = await receiver.wait_for(2)
    assert len(second.headers["webhook-signature"].split(" ")) == 1
    verified(newest, second)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verified(new, second)


async def test_a_crashed_workers_lease_runs_out_and_another_delivers(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    """Claimed and never settled (the worker died mid-send): due again after the lease."""
    async with Receiver() as receiver:
        await subscribe(pool, receiver.url)
        (delivery,) = await deliveries_of(pool, await finish(pool))
        async with pool.acquire() as conn:
            (claimed,) = await store.claim_due(conn, 10, lease=0.5, max_attempts=8)
            assert (
                await store.claim_due(conn, 10, lease=0.5, max_attempts=8) == []
            )  # leased: not claimed twice
        assert claimed["id"] == delivery["id"]
        async with running_worker(pool, relay_settings(db_settings)):
            await wait_status(pool, delivery["id"], "delivered")
    assert len(receiver.requests) == 1
    assert [a["attempt"] for a in await attempts_of(pool, delivery["id"])] == [2]


async def test_claims_of_a_worker_that_always_dies_stop_at_the_attempt_limit(
    pool: asyncpg.Pool,
) -> None:
    """Each claim counts an attempt and nobody records one (a lease of 0: the worker
    died at once): after the limit the claim fails the delivery instead of leasing it."""
    await subscribe(pool, "http://127.0.0.1:9/hook")
    (delivery,) = await deliveries_of(pool, await finish(pool))
    leased = 0
    async with pool.acquire() as conn:
        for _ in range(6):
            leased += len(await store.claim_due(conn, 10, lease=0, max_attempts=3))
    assert leased == 3
    row = await pool.fetchrow("SELECT * FROM webhook_deliveries WHERE id = $1", delivery["id"])
    assert (row["status"], row["attempts"]) == ("failed", 3)
    (abandoned,) = await attempts_of(pool, delivery["id"])
    assert abandoned["attempt"] == 3
    assert abandoned["error"] == "abandoned: no outcome recorded after 3 attempts"


# --- the API -----------------------------------------------------------------------


@pytest.fixture
def local_api_settings(api_settings: ApiSettings) -> ApiSettings:
    return api_settings.model_copy(update={"webhook_allowed_hosts": LOCAL})


async def test_subscriptions_are_made_read_changed_rotated_and_deleted(
    local_api_settings: ApiSettings,
) -> None:
    async with app_client_for(local_api_settings) as client:
        made = await client.post(
            "/api/v1/webhooks",
            json={"url": "http://127.0.0.1:9/hook", "events": ["task.done", "task.done"]},
        )
        assert made.status_code == 201, made.text
        webhook = made.json()
        assert webhook["secret"].startswith("whsec_")
        assert webhook["events"] == ["task.done"]
        assert made.headers["location"] == f"/api/v1/webhooks/{webhook['id']}"
        shown = (await client.get(made.headers["location"])).json()
        assert "secret" not in shown and shown["url"] == "http://127.0.0.1:9/hook"
        listed = (await client.get("/api/v1/webhooks")).json()["items"]
        assert [w["id"] for w in listed] == [webhook["id"]] and "secret" not in listed[0]

        changed = await client.patch(
            made.headers["location"],
            json={"events": ["task.failed"], "task_types": ["sha256"], "enabled": False},
        )
        assert changed.status_code == 200, changed.text
        body = changed.json()
        assert (body["events"], body["task_types"], body["enabled"]) == (
            ["task.failed"],
            ["sha256"],
            False,
        )
        assert body["url"] == "http://127.0.0.1:9/hook"
        cleared = await client.patch(made.headers["location"], json={"task_types": None})
        assert cleared.json()["task_types"] is None

        rotated = await client.post(f"{made.headers['location']}/rotate-secret")
        assert rotated.status_code == 200, rotated.text
        assert rotated.json()["secret"] not in (webhook["secret"], None)
        assert rotated.json()["previous_secret_expires_at"] is not None

        assert (await client.delete(made.headers["location"])).status_code == 204
        gone = await client.get(made.headers["location"])
        assert gone.status_code == 404 and "does not exist" in gone.json()["detail"]
        deliveries = await client.get(f"{made.headers['location']}/deliveries")
        assert deliveries.status_code == 404


@pytest.mark.parametrize(
    ("body", "loc", "message"),
    [
        ({"url": "http://127.0.0.1/"}, ["body", "url"], "loopback"),
        ({"url": "http://10.1.2.3/"}, ["body", "url"], "a private address"),
        ({"url": "http://169.254.169.254/latest"}, ["body", "url"], "cloud metadata"),
        ({"url": "http://[::1]:8080/"}, ["body", "url"], "loopback"),
        ({"url": "http://[::ffff:127.0.0.1]/"}, ["body", "url"], "loopback"),
        ({"url": "http://100.64.0.1/"}, ["body", "url"], "carrier-grade NAT"),
        ({"url": "http://0.0.0.0/"}, ["body", "url"], "unspecified"),
        (
            {"url": "http://localhost:9/"},
            ["body", "url"],
            "'localhost' resolves to an address webhooks may not reach",
        ),
        ({"url": "http://2130706433/"}, ["body", "url"], "loopback"),  # 127.0.0.1 as a number
        ({"url": "ftp://example.com/"}, ["body", "url"], "http:// or https://"),
        ({"url": "https://u:p@example.com/"}, ["body", "url"], "no user name or password"),
        ({"url": "not a url"}, ["body", "url"], "whitespace"),
        ({"url": "http://no-such-host.invalid/"}, ["body", "url"], "does not resolve"),
        ({"events": ["task.started"]}, ["body", "events", 0], "task.done"),
        ({"events": []}, ["body", "events"], "at least 1"),
        ({"task_types": ["nope"]}, ["body", "task_types", 0], "unknown task type 'nope'"),
        ({"queues": ["bad queue"]}, ["body", "queues", 0], "invalid queue name"),
    ],
)
async def test_bad_subscriptions_are_422_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], loc: list[Any], message: str
) -> None:
    # a global address as a literal: valid without DNS
    request = {"url": "https://93.184.215.14/hook", "events": ["task.done"], **body}
    answered = await client.post("/api/v1/webhooks", json=request)
    assert answered.status_code == 422, answered.text
    problem = answered.json()
    assert problem["errors"][0]["loc"] == loc, problem
    assert message in problem["errors"][0]["msg"], problem


async def test_the_422_for_an_internal_name_does_not_say_what_it_resolves_to(
    client: httpx.AsyncClient,
) -> None:
    """Whoever may subscribe must not map the network by what internal names resolve
    to: the problem says the address is not reachable for webhooks, not which it is."""
    request = {"url": "http://localhost:9/", "events": ["task.done"]}
    answered = await client.post("/api/v1/webhooks", json=request)
    assert answered.status_code == 422, answered.text
    assert "resolves to an address webhooks may not reach" in answered.text
    for revealing in ("127.0.0.1", "::1", "a loopback address"):
        assert revealing not in answered.text


async def test_a_tasks_deliveries_list_subscription_and_callback_ones_newest_first(
    pool: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    """A callback delivery has no webhook to list it under: the task's own listing
    shows it with the subscriptions' ones."""
    webhook_id, _ = await subscribe(pool, "http://127.0.0.1:9/sub")
    task_id = await finish(pool, callback_url="http://127.0.0.1:9/cb")
    other = await finish(pool)  # another task's delivery is not listed
    # distinct times, so that the order shows (one UPDATE gave both the same)
    await pool.execute(
        "UPDATE webhook_deliveries SET created_at = created_at - interval '1 minute'"
        " WHERE task_id = $1 AND webhook_id IS NOT NULL",
        task_id,
    )
    answered = await client.get(f"/api/v1/tasks/{task_id}/webhook-deliveries")
    assert answered.status_code == 200, answered.text
    items = answered.json()["items"]
    assert [(d["webhook_id"], d["url"]) for d in items] == [
        (None, "http://127.0.0.1:9/cb"),
        (str(webhook_id), "http://127.0.0.1:9/sub"),
    ]
    assert {d["task_id"] for d in items} == {str(task_id)}
    assert other != task_id

    missing = await client.get(f"/api/v1/tasks/{uuid.uuid4()}/webhook-deliveries")
    assert missing.status_code == 404, missing.text
    assert "does not exist" in missing.json()["detail"]
    quiet = await create_task(pool, NewTask("echo", {}, 0, 3))  # no outcome yet
    none_yet = await client.get(f"/api/v1/tasks/{quiet['id']}/webhook-deliveries")
    assert none_yet.json() == {"items": []}


async def test_patch_refuses_null_and_internal_urls(local_api_settings: ApiSettings) -> None:
    async with app_client_for(local_api_settings) as client:
        made = await client.post(
            "/api/v1/webhooks", json={"url": "http://127.0.0.1:9/", "events": ["task.done"]}
        )
        location = made.headers["location"]
        for field in ("url", "events", "enabled"):
            answered = await client.patch(location, json={field: None})
            assert answered.status_code == 422, answered.text
            assert answered.json()["errors"][0]["loc"] == ["body", field]
        internal = await client.patch(location, json={"url": "http://10.0.0.1/"})
        assert internal.status_code == 422 and "private" in internal.json()["detail"]
        missing = await client.patch(f"/api/v1/webhooks/{uuid.uuid4()}", json={"enabled": True})
        assert missing.status_code == 404


# --- callback_url, and the whole path through real processes -------------------------


async def test_callback_url_is_refused_without_the_secret_and_when_internal(
    local_api_settings: ApiSettings, api_settings: ApiSettings
) -> None:
    task = {"type": "echo", "payload": {}, "callback_url": "http://127.0.0.1:9/cb"}
    async with app_client_for(local_api_settings) as client:
        answered = await client.post("/api/v1/tasks", json=task)
        assert answered.status_code == 422, answered.text
        assert answered.json()["errors"][0]["loc"] == ["body", "callback_url"]
        assert "WEBHOOK_CALLBACK_SECRET" in answered.json()["detail"]
    with_secret = api_settings.model_copy(update={"webhook_callback_secret": new_secret()})
    async with app_client_for(with_secret) as client:
        answered = await client.post("/api/v1/tasks", json=task)
        assert answered.status_code == 422, answered.text
        assert "a loopback address" in answered.json()["detail"]
        batch = await client.post(
            "/api/v1/tasks/batch",
            json={"tasks": [{"type": "echo", "payload": {}}, task]},
        )
        assert batch.status_code == 422, batch.text
        assert batch.json()["errors"][0]["loc"] == ["body", "tasks", 1, "callback_url"]
        bad = await client.post("/api/v1/tasks", json={**task, "callback_url": "gopher://x/"})
        assert bad.status_code == 422 and "http:// or https://" in bad.json()["detail"]


async def test_keyed_creates_with_another_callback_url_conflict(
    api_settings: ApiSettings,
) -> None:
    settings = api_settings.model_copy(
        update={"webhook_callback_secret": new_secret(), "webhook_allowed_hosts": LOCAL}
    )
    task = {"type": "echo", "payload": {}, "callback_url": "http://127.0.0.1:9/a"}
    key = {"Idempotency-Key": uuid.uuid4().hex}
    async with app_client_for(settings) as client:
        assert (await client.post("/api/v1/tasks", json=task, headers=key)).status_code == 201
        assert (await client.post("/api/v1/tasks", json=task, headers=key)).status_code == 200
        other = {**task, "callback_url": "http://127.0.0.1:9/b"}
        assert (await client.post("/api/v1/tasks", json=other, headers=key)).status_code == 409


async def test_outcomes_reach_subscriptions_and_callbacks_through_real_processes(
    service_env: dict[str, str],
) -> None:
    """api, relay (its delivery worker) and consumer as processes: a subscription and a
    per-task callback_url (single and batch creates) each get their signed event."""
    callback_secret = new_secret()
    env = {
        **service_env,
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "WEBHOOK_CALLBACK_SECRET": callback_secret,
        "WEBHOOK_RETRY_BASE_DELAY": "0.1",
    }
    port = free_port()
    async with Receiver(failing_first(1)) as receiver:
        api = await ServiceProcess("api", env, API_PORT=str(port)).start()
        relay = await ServiceProcess("relay", env).start()
        consumer = await ServiceProcess("consumer", env).start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                made = await client.post(
                    "/api/v1/webhooks",
                    json={"url": f"{receiver.url}/sub", "events": ["task.done", "task.failed"]},
                )
                assert made.status_code == 201, made.text
                secret = made.json()["secret"]
                single = await client.post(
                    "/api/v1/tasks",
                    json={
                        "type": "echo",
                        "payload": {"n": 1},
                        "callback_url": f"{receiver.url}/cb",
                    },
                )
                assert single.status_code == 201, single.text
                batch = await client.post(
                    "/api/v1/tasks/batch",
                    json={
                        "tasks": [
                            {"type": "echo", "payload": {"n": 2}},
                            {
                                "type": "fail",
                                "payload": {},
                                "max_attempts": 1,
                                "callback_url": f"{receiver.url}/cb",
                            },
                        ]
                    },
                )
                assert batch.status_code == 201, batch.text
                # 3 subscription events, 2 callbacks, and the first request's retry
                requests = await receiver.wait_for(6, timeout=30)
                await asyncio.sleep(0.3)
                assert len(receiver.requests) == 6
        finally:
            assert await consumer.stop(signal.SIGTERM) == 0, consumer.output
            assert await relay.stop(signal.SIGTERM) == 0, relay.output
            assert await api.stop(signal.SIGTERM) in (0, -signal.SIGTERM), api.output
    delivered = requests[1:]  # the first got a 500 and came again
    by_path: dict[str, list[tuple[str, str]]] = {"/sub": [], "/cb": []}
    for request in delivered:
        event = verified(secret if request.path == "/sub" else callback_secret, request)
        by_path[request.path].append((event["data"]["id"], event["type"]))
    single_id, (echo_id, fail_id) = (
        single.json()["id"],
        [t["id"] for t in batch.json()["items"]],
    )
    assert sorted(by_path["/sub"]) == sorted(
        [(single_id, "task.done"), (echo_id, "task.done"), (fail_id, "task.failed")]
    )
    assert sorted(by_path["/cb"]) == sorted([(single_id, "task.done"), (fail_id, "task.failed")])
    assert "webhooks on" in relay.output


async def test_a_body_the_json_codec_refuses_neither_blocks_others_nor_stops_the_relay(
    pool: asyncpg.Pool, service_env: dict[str, str]
) -> None:
    """A body jsonb holds but orjson refuses (a number beyond a double, written by SQL),
    due first, next to a good one: the relay process stays up, both are sent, each
    with the bytes it was signed over."""
    async with Receiver() as receiver:
        _, secret = await subscribe(pool, receiver.url)
        (poison,) = await deliveries_of(pool, await finish(pool))
        (good,) = await deliveries_of(pool, await finish(pool))
        await pool.execute(
            "UPDATE webhook_deliveries SET body = '{\"n\": 1e400}'::jsonb,"
            " next_attempt_at = now() - interval '1 minute' WHERE id = $1",
            poison["id"],
        )
        env = {**service_env, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
        relay = await ServiceProcess("relay", env).start()
        try:
            # (not wait_status: its SELECT * would decode the poison body here)
            for _ in range(400):  # 20 s
                delivered = await pool.fetchval(
                    "SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'"
                )
                if delivered == 2:
                    break
                await asyncio.sleep(0.05)
            assert relay.proc is not None and relay.proc.returncode is None, relay.output
            statuses = await pool.fetch("SELECT id, status FROM webhook_deliveries")
            assert {(r["id"], r["status"]) for r in statuses} == {
                (poison["id"], "delivered"),
                (good["id"], "delivered"),
            }
        finally:
            assert await relay.stop(signal.SIGTERM) == 0, relay.output
    assert len(receiver.requests) == 2
    events = [verified(secret, request) for request in receiver.requests]
    assert {"n": 10**400} in events


async def test_the_enqueue_notify_wakes_the_worker_through_the_relays_listener(
    pool: asyncpg.Pool, db_settings: DatabaseSettings
) -> None:
    """A poll far away: only the trigger's NOTIFY, heard on the relay's one LISTEN
    connection (its webhook channel), can bring the delivery out within seconds."""
    settings = relay_settings(db_settings, webhook_poll_interval=60.0)
    outbox_wake, webhook_wake = asyncio.Event(), asyncio.Event()
    listener = OutboxListener(settings, outbox_wake, 1.0, {WEBHOOK_CHANNEL: webhook_wake})
    async with Receiver() as receiver:
        await subscribe(pool, receiver.url)
        listening = asyncio.create_task(listener.run())
        worker = DeliveryWorker(pool, settings, webhook_wake, RelayMetrics())
        delivering = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(10):
                await outbox_wake.wait()  # set once the listener is connected and listening
            await asyncio.sleep(0.3)  # the worker has looked once, found nothing, sleeps
            outbox_wake.clear()
            await finish(pool)
            await receiver.wait_for(1, timeout=5)
        finally:
            for task in (delivering, listening):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert not outbox_wake.is_set()  # a webhook NOTIFY does not start an outbox drain
