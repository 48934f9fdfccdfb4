"""The webhook delivery worker: a loop of the relay that sends the webhook outbox.

It claims due deliveries (db.webhooks.claim_due: FOR UPDATE SKIP LOCKED, leased for the
attempt's timeout plus a margin, so relays share the work and a killed one's rows come
due again), sends each with a timeout and without following redirects, records every
attempt, and settles the delivery: delivered on a 2xx, else retried with exponential
backoff and jitter until WEBHOOK_MAX_ATTEMPTS, then failed (replayable over the API).
A NOTIFY on ``taskbox_webhooks`` wakes it; it polls as well.

Before each attempt the destination is resolved and checked again
(taskbox.webhooks.destinations), and the request goes to the address that passed,
with the URL's host in the Host header and, for https, as the TLS server name: DNS
cannot answer differently between the check and the connection. httpx is told not to
read proxy settings from the environment, since a proxy would connect on our behalf to
whatever the name resolves to there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import asyncpg
import httpx

from taskbox.db import webhooks as store
from taskbox.db.errors import TRANSIENT_DB_ERRORS
from taskbox.db.webhooks import AttemptRecord
from taskbox.relay.metrics import RelayMetrics
from taskbox.relay.settings import RelaySettings
from taskbox.runtime.backoff import backoff_delay
from taskbox.webhooks import AllowList, UnsafeDestination, check_url, resolve_destination, sign
from taskbox.webhooks.destinations import InvalidWebhookUrl

log = logging.getLogger(__name__)

RESPONSE_PREFIX = 1024  # bytes of a receiver's answer kept with the attempt
LEASE_MARGIN = 5.0  # seconds past the timeout before another worker may try again
MAX_ERROR = 500
CLAIM_BACKOFF_CAP = 30.0  # seconds: the longest pause after claims that kept failing
USER_AGENT = "Taskbox-Webhooks/1"

_DB_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError)


Clients = dict[str, httpx.AsyncClient]  # by URL scheme


def delivery_limits(concurrency: int, scheme: str) -> httpx.Limits:
    """The connection limits of the client that sends to ``scheme`` URLs.

    The sender connects to scheme://address:port and names the host only as the TLS
    server name, so the connection pool keys its connections by (scheme, address,
    port): a kept-alive TLS connection verified for a.example would carry a delivery
    to b.example at the same address. For https, no connection is kept: each delivery
    has its own handshake, verified for its own host. This costs a handshake a
    delivery but needs no pool of clients per host name (with its own bounds and
    eviction) and cannot mix hosts whatever the pool's keying. Plain http keeps its
    connections: the Host header of each request names its host, and nothing was
    verified that another host could borrow.
    """
    keep_alive = 0 if scheme == "https" else concurrency
    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=keep_alive)


class NoSecret(Exception):
    """A callback delivery while WEBHOOK_CALLBACK_SECRET is unset."""


def _text_prefix(data: bytes) -> str:
    # Cut at a byte count, then drop a character the cut split and any NUL (which a
    # Postgres text cannot hold): at most RESPONSE_PREFIX bytes once stored.
    return data[:RESPONSE_PREFIX].decode("utf-8", "ignore").replace("\x00", "")


class DeliveryWorker:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: RelaySettings,
        wake: asyncio.Event,
        metrics: RelayMetrics,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._wake = wake
        self._metrics = metrics
        self._allow: AllowList = settings.allow_list
        secret = settings.webhook_callback_secret
        self._callback_secret = secret.get_secret_value() if secret is not None else None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._transport = transport
        self.delivered_total = 0

    def _client(self, scheme: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=self._settings.webhook_timeout,
            limits=delivery_limits(self._settings.webhook_concurrency, scheme),
            transport=self._transport,
        )

    async def run(self) -> None:
        settings = self._settings
        lease = settings.webhook_timeout + LEASE_MARGIN
        next_backlog = 0.0
        claim_failures = 0  # in a row: the pause before the next claim grows with them
        async with self._client("http") as plain, self._client("https") as tls:
            clients = {"http": plain, "https": tls}
            try:
                while True:
                    self._wake.clear()  # before the claim: a NOTIFY after it is kept
                    if time.monotonic() >= next_backlog:
                        next_backlog = time.monotonic() + settings.relay_backlog_interval
                        await self._refresh_backlog()
                    free = settings.webhook_concurrency - len(self._in_flight)
                    claimed: list[asyncpg.Record] = []
                    if free > 0:
                        try:
                            async with self._pool.acquire() as conn:
                                claimed = await store.claim_due(
                                    conn, free, lease, settings.webhook_max_attempts
                                )
                            claim_failures = 0
                        except _DB_ERRORS as exc:
                            log.warning("claiming webhook deliveries failed: %s", exc)
                            claim_failures += 1
                        except Exception:
                            # Not a database outage but a bug or a row the claim cannot
                            # read: the worker keeps going (it shares the relay with the
                            # outbox publisher, which would stop with it), slower.
                            log.exception("claiming webhook deliveries failed unexpectedly")
                            claim_failures += 1
                        if claim_failures:
                            await asyncio.sleep(
                                backoff_delay(
                                    claim_failures,
                                    settings.webhook_poll_interval,
                                    CLAIM_BACKOFF_CAP,
                                )
                            )
                            continue
                    for row in claimed:
                        task = asyncio.create_task(self._deliver(clients, row))
                        self._in_flight.add(task)
                        task.add_done_callback(self._in_flight.discard)
                    if free > 0 and len(claimed) == free:
                        continue  # maybe more are due
                    waiters: list[Any] = [asyncio.ensure_future(self._wake.wait())]
                    waiters += list(self._in_flight) if free <= 0 else []
                    try:
                        await asyncio.wait(
                            waiters,
                            timeout=settings.webhook_poll_interval,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        waiters[0].cancel()
            finally:
                for task in list(self._in_flight):
                    task.cancel()
                await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _refresh_backlog(self) -> None:
        try:
            self._metrics.webhook_backlog.set(await store.pending_backlog(self._pool))
        except _DB_ERRORS as exc:
            log.warning("reading the webhook backlog failed: %s", exc)

    def _secrets(self, row: asyncpg.Record) -> list[str]:
        if row["webhook_id"] is None:
            if self._callback_secret is None:
                raise NoSecret("WEBHOOK_CALLBACK_SECRET is not set: callbacks cannot be signed")
            return [self._callback_secret]
        return [s for s in (row["secret"], row["previous_secret"]) if s is not None]

    async def _deliver(self, clients: Clients, row: asyncpg.Record) -> None:
        try:
            await self._attempt(clients, row)
        except Exception:
            # One row's bookkeeping gone wrong is that row's problem: its lease runs
            # out, the next claim counts another attempt, and the limit ends it.
            log.exception("webhook delivery %s: unexpected error", row["id"])

    async def _attempt(self, clients: Clients, row: asyncpg.Record) -> None:
        delivery_id: uuid.UUID = row["id"]
        attempt: int = row["attempts"]
        started = time.monotonic()
        status_code: int | None = None
        error: str | None = None
        answer: str | None = None
        try:
            status_code, answer = await self._send(clients, row)
        except (InvalidWebhookUrl, UnsafeDestination, NoSecret) as exc:
            error = str(exc)
        except TimeoutError:
            error = f"no complete answer within {self._settings.webhook_timeout:g}s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:
            # Still an attempt, recorded and retried: a bug here must not leave the
            # delivery leased and silent, nor kill the loop.
            log.exception("webhook delivery %s: unexpected error", delivery_id)
            error = f"{type(exc).__name__}: {exc}"
        latency = time.monotonic() - started
        self._metrics.webhook_attempt_seconds.observe(latency)
        delivered = status_code is not None and 200 <= status_code < 300
        if status_code is not None and not delivered:
            error = f"answered {status_code}" + (
                " (redirects are not followed)" if 300 <= status_code < 400 else ""
            )
        settings = self._settings
        retry_in = None
        if not delivered and attempt < settings.webhook_max_attempts:
            retry_in = backoff_delay(
                attempt, settings.webhook_retry_base_delay, settings.webhook_retry_max_delay
            )
        record = AttemptRecord(
            delivery_id,
            attempt,
            status_code,
            round(latency * 1000, 3),
            error[:MAX_ERROR] if error else None,
            answer,
            delivered,
            retry_in,
        )
        try:
            outcome = await store.record_attempt(self._pool, record)
        except _DB_ERRORS as exc:
            # The lease runs out and the delivery is sent again: a duplicate, not a loss.
            log.warning("recording webhook attempt of %s failed: %s", delivery_id, exc)
            return
        except Exception:
            log.exception("recording webhook attempt of %s failed unexpectedly", delivery_id)
            return
        if outcome == "delivered":
            self.delivered_total += 1
            self._metrics.webhook_deliveries.labels("delivered").inc()
        elif outcome == "failed":
            self._metrics.webhook_deliveries.labels("failed").inc()
            log.warning(
                "webhook delivery %s failed after %d attempts: %s", delivery_id, attempt, error
            )
        elif outcome == "pending":
            self._metrics.webhook_deliveries.labels("retried").inc()

    async def _send(self, clients: Clients, row: asyncpg.Record) -> tuple[int, str]:
        """POST the delivery; the status code and a prefix of the answer."""
        target = check_url(row["url"])
        client = clients[target.scheme]
        secrets_in_use = self._secrets(row)
        async with asyncio.timeout(self._settings.webhook_timeout):
            addresses = await resolve_destination(target, self._allow)
            body = str(row["body"]).encode()  # the claim's text: signed and sent as is
            message_id = str(row["id"])
            timestamp = int(time.time())
            headers = {
                "host": target.host_header,
                "content-type": "application/json",
                "user-agent": USER_AGENT,
                "webhook-id": message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(secrets_in_use, message_id, timestamp, body),
            }
            extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
            request = client.build_request(
                "POST",
                target.url_for(addresses[0]),
                content=body,
                headers=headers,
                extensions=extensions,
            )
            response = await client.send(request, stream=True)
            try:
                kept = bytearray()
                async for chunk in response.aiter_bytes():
                    kept += chunk
                    if len(kept) >= RESPONSE_PREFIX:
                        break
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    await response.aclose()
            return response.status_code, _text_prefix(bytes(kept))
