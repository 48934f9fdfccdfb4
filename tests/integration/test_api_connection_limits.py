"""What a client can hold of the api before it is authenticated: a real ``python -m api``.

Each test starts its own api process with small limits (``API_HEADER_TIMEOUT``,
``API_BODY_TIMEOUT``, ``API_KEEP_ALIVE_TIMEOUT``, ``API_MAX_HEADER_BYTES``,
``API_CONCURRENCY_LIMIT``) and talks raw HTTP/1.1 over sockets, since what is tested
is the server's handling of connections that no HTTP client library would make.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest

from taskbox.db.settings import DatabaseSettings
from tests.integration.processes import ServiceProcess, free_port

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: taskbox\r\n\r\n"
# A request head that stops in the middle of a header line, as a slowloris client does.
PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: taskbox\r\nX-Slow: a"
HEADER_LIMIT = 16_384


@pytest.fixture
def api_env(db_settings: DatabaseSettings) -> dict[str, str]:
    """Environment of an api process on this test's database; no broker needed."""
    return {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": db_settings.database_url,
        "OUTBOX_CHANNEL": db_settings.outbox_channel,
        "PYTHONUNBUFFERED": "1",
        "API_ACCESS_LOG": "false",
    }


class Api:
    def __init__(self, process: ServiceProcess, port: int) -> None:
        self.process = process
        self.port = port

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    async def healthz(self) -> int:
        """GET /healthz on a new connection; its status."""
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            return (await client.get("/healthz", timeout=5)).status_code

    async def connect(self) -> Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port), timeout=5
        )
        return Connection(reader, writer)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_until_closed(self, within: float) -> bytes:
        """Everything the server sends until it closes; TimeoutError if it does not."""
        received = b""
        async with asyncio.timeout(within):
            while True:
                try:
                    chunk = await self.reader.read(65_536)
                except ConnectionError:  # reset, or a write of ours met the close
                    return received
                if not chunk:
                    return received
                received += chunk

    async def read_response(self, within: float = 5.0) -> tuple[int, bytes]:
        """One response with a Content-Length body: (status, body); the connection stays."""
        async with asyncio.timeout(within):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(
                int(line.split(":", 1)[1])
                for line in lines
                if line.lower().startswith("content-length:")
            )
            body = await self.reader.readexactly(length)
        return int(lines[0].split()[1]), body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@asynccontextmanager
async def running_api(env: dict[str, str], **settings: str) -> AsyncIterator[Api]:
    port = free_port()
    process = await ServiceProcess("api", env, API_PORT=str(port), **settings).start()
    try:
        # "Application startup complete" (processes.READY) comes before uvicorn listens.
        await process.wait_for("Uvicorn running on", timeout=10)
        yield Api(process, port)
    finally:
        process.kill()
        await process.wait(timeout=10)


@asynccontextmanager
async def connections(api: Api, count: int) -> AsyncIterator[list[Connection]]:
    """``count`` open connections, all closed afterwards whatever happens."""
    opened: list[Connection] = []
    try:
        for _ in range(count // 50 + 1):  # in groups, not 300 SYNs at once
            group = min(50, count - len(opened))
            if group:
                opened += await asyncio.gather(*(api.connect() for _ in range(group)))
        yield opened
    finally:
        await asyncio.gather(*(conn.close() for conn in opened))


async def closed_by_server(conns: list[Connection], within: float) -> list[bytes]:
    """What each connection received before the server closed it, all within ``within``."""
    reads: list[Awaitable[bytes]] = [conn.read_until_closed(within) for conn in conns]
    return await asyncio.gather(*reads)


# ------------------------------------------------------------ idle and half-sent heads


async def test_idle_and_half_sent_connections_are_closed_at_the_header_deadline(
    api_env: dict[str, str],
) -> None:
    async with (
        running_api(api_env, API_HEADER_TIMEOUT="1.5", API_CONCURRENCY_LIMIT="2000") as api,
        connections(api, 300) as idle,
        connections(api, 300) as half_sent,
    ):
        opened = time.monotonic()
        await asyncio.gather(*(conn.send(PARTIAL_HEAD) for conn in half_sent))
        # Meanwhile the api answers everybody else.
        assert await api.healthz() == 200

        received = await closed_by_server(idle + half_sent, within=10)
        closed_after = time.monotonic() - opened

        assert closed_after < 10
        # An idle connection is closed without a word; a half-sent head gets a 408.
        assert all(data == b"" for data in received[:300]), received[:3]
        assert all(data == b"" or data.startswith(b"HTTP/1.1 408 ") for data in received[300:]), (
            received[300:303]
        )
        assert await api.healthz() == 200


async def test_a_half_sent_head_on_a_keep_alive_connection_meets_the_header_deadline(
    api_env: dict[str, str],
) -> None:
    """The deadline is set again for each request, not only for a connection's first."""
    async with (
        running_api(api_env, API_HEADER_TIMEOUT="1", API_KEEP_ALIVE_TIMEOUT="60") as api,
        connections(api, 1) as (conn,),
    ):
        for _ in range(3):
            await conn.send(HEALTHZ)
            assert (await conn.read_response())[0] == 200
        await conn.send(PARTIAL_HEAD)
        started = time.monotonic()
        received = await conn.read_until_closed(within=5)
        assert time.monotonic() - started < 4
        assert received == b"" or received.startswith(b"HTTP/1.1 408 "), received


async def test_a_head_dripped_byte_by_byte_meets_the_header_deadline(
    api_env: dict[str, str],
) -> None:
    """Bytes that keep arriving do not extend the deadline: it is for the whole head."""
    async with (
        running_api(api_env, API_HEADER_TIMEOUT="1") as api,
        connections(api, 1) as (conn,),
    ):
        started = time.monotonic()
        for byte in PARTIAL_HEAD + b"x" * (100 - len(PARTIAL_HEAD)):  # 100 bytes over 5 s
            try:
                await conn.send(bytes([byte]))
                received = await asyncio.wait_for(conn.reader.read(65_536), timeout=0.05)
            except TimeoutError:
                continue
            except OSError:
                break  # reset by the server
            if not received:
                break  # closed by the server
        assert time.monotonic() - started < 3


# ---------------------------------------------------------------------- head size


def huge_head(shape: str, size: int) -> list[bytes]:
    """A request head of about ``size`` bytes in 64 KiB writes, never finished."""
    if shape == "one long header":
        headers = b"X-Long: " + b"a" * size
    else:
        headers = b"".join(b"X-H%07d: %s\r\n" % (i, b"b" * 80) for i in range(size // 93))
    data = b"GET /healthz HTTP/1.1\r\nHost: taskbox\r\n" + headers
    return [data[i : i + 65_536] for i in range(0, len(data), 65_536)]


@pytest.mark.parametrize("shape", ["one long header", "many headers"])
async def test_a_head_past_the_limit_is_refused_at_once_without_memory_growth(
    api_env: dict[str, str], shape: str
) -> None:
    async with (
        running_api(api_env, API_MAX_HEADER_BYTES=str(HEADER_LIMIT)) as api,
        connections(api, 1) as (conn,),
    ):
        assert await api.healthz() == 200
        before = api.rss_kib()
        writes = huge_head(shape, 8 * 1024 * 1024)
        started = time.monotonic()
        sent = 0
        for data in writes:
            try:
                await asyncio.wait_for(conn.send(data), timeout=5)
            except OSError:
                break  # closed by the server: the rest cannot be sent
            sent += len(data)
            if conn.reader.at_eof():
                break
        received = await conn.read_until_closed(within=5)
        elapsed = time.monotonic() - started

        assert received == b"" or received.startswith(b"HTTP/1.1 431 "), received[:200]
        assert elapsed < 3
        # The server stopped reading long before 8 MiB (socket buffers hold a few MiB).
        grown = api.rss_kib() - before
        assert grown < 4096, f"RSS grew by {grown} KiB"
        assert await api.healthz() == 200


async def test_a_head_within_the_limit_is_served_with_a_body_in_the_same_write(
    api_env: dict[str, str],
) -> None:
    """The limit counts each head alone: not a body, nor other heads, in the same write."""
    async with (
        running_api(api_env, API_MAX_HEADER_BYTES=str(HEADER_LIMIT)) as api,
        connections(api, 1) as (conn,),
    ):
        padding = b"p" * (HEADER_LIMIT - 200)
        await conn.send(
            b"GET /healthz HTTP/1.1\r\nHost: taskbox\r\nX-Pad: " + padding + b"\r\n\r\n"
        )
        assert (await conn.read_response())[0] == 200
        strings = ",".join(['"' + "x" * 50_000 + '"'] * 10)  # each under MAX_PAYLOAD_STRING
        body = b'{"type":"echo","payload":{"items":[%s]}}' % strings.encode()
        await conn.send(
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: taskbox\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        status, answer = await conn.read_response()
        assert status == 201, answer[:300]
        # Pipelined: three heads in one write, each answered in turn.
        await conn.send(HEALTHZ * 3)
        for _ in range(3):
            assert (await conn.read_response())[0] == 200


# ---------------------------------------------------------------------- body deadline


async def test_a_stalled_body_is_answered_408_and_closed_at_the_body_deadline(
    api_env: dict[str, str],
) -> None:
    async with (
        running_api(api_env, API_BODY_TIMEOUT="1") as api,
        connections(api, 1) as (conn,),
    ):
        await conn.send(
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: taskbox\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"type":"echo",'
        )
        started = time.monotonic()
        received = await conn.read_until_closed(within=5)
        assert time.monotonic() - started < 4
        assert received == b"" or received.startswith(b"HTTP/1.1 408 "), received[:200]
        assert await api.healthz() == 200


# ------------------------------------------------------------------------- keep-alive


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
    api_env: dict[str, str],
) -> None:
    async with (
        running_api(api_env, API_KEEP_ALIVE_TIMEOUT="1", API_HEADER_TIMEOUT="60") as api,
        connections(api, 1) as (conn,),
    ):
        await conn.send(HEALTHZ)
        assert (await conn.read_response())[0] == 200
        answered = time.monotonic()
        assert await conn.read_until_closed(within=4) == b""
        assert time.monotonic() - answered < 3


# ------------------------------------------------------------------ concurrency cap


async def test_past_the_concurrency_limit_the_api_answers_503(
    api_env: dict[str, str],
) -> None:
    limit = 20
    body = b'{"type":"echo","payload":{"pad":"%s"}}' % (b"p" * 64)
    head = (
        b"POST /api/v1/tasks HTTP/1.1\r\nHost: taskbox\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    async with running_api(
        api_env, API_CONCURRENCY_LIMIT=str(limit), API_HEADER_TIMEOUT="60", API_BODY_TIMEOUT="60"
    ) as api:
        # Half the limit in requests in flight (each waiting for the rest of its body),
        # admitted first: every open connection counts, their own included.
        async with connections(api, limit // 2) as in_flight:
            await asyncio.gather(*(conn.send(head + body[:1]) for conn in in_flight))
            await asyncio.sleep(0.5)
            async with connections(api, limit // 2):  # and half idle
                await asyncio.sleep(0.5)
                started = time.monotonic()
                assert await api.healthz() == 503
                assert time.monotonic() - started < 2
            # A request in flight was kept, and is served once its body arrives.
            await in_flight[0].send(body[1:])
            status, answer = await in_flight[0].read_response()
            assert status == 201, answer[:300]
        # Once they are gone, requests are served again.
        for _ in range(50):
            if await api.healthz() == 200:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("still refused after the held connections closed")


# --------------------------------------------------------------------- pipelining


async def test_a_pipelined_request_waiting_behind_a_slow_one_is_not_timed_out(
    api_env: dict[str, str], db_settings: DatabaseSettings
) -> None:
    # The first create waits on a table lock; a second request, pipelined behind it,
    # sends its body a moment later. uvicorn stops reading while the first runs, so the
    # second's body sits unread: that is the server's doing, not the client's, and
    # must not cost it a 408 (which went out as the answer to the first request).
    body = b'{"type":"echo","payload":{"n":1}}'
    head = (
        b"POST /api/v1/tasks HTTP/1.1\r\nHost: taskbox\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    locker = await asyncpg.connect(db_settings.database_url)
    try:
        async with (
            running_api(api_env, API_BODY_TIMEOUT="1", API_HEADER_TIMEOUT="60") as api,
            connections(api, 1) as (conn,),
        ):
            transaction = locker.transaction()
            await transaction.start()
            await locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
            await conn.send(head + body)
            await asyncio.sleep(0.2)
            await conn.send(head)
            await asyncio.sleep(0.3)
            await conn.send(body)
            await asyncio.sleep(2.5)  # past API_BODY_TIMEOUT, the first still waiting
            await transaction.rollback()
            first = await conn.read_response(within=10)
            second = await conn.read_response(within=10)
            assert (first[0], second[0]) == (201, 201), (first[1][:200], second[1][:200])
    finally:
        await locker.close()
