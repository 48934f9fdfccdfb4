"""A small HTTP receiver for webhook tests, on 127.0.0.1: it records every request and
answers as the test's plan says (a status, a redirect, or no answer in time)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Answer:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering: longer than the sender's timeout hangs


@dataclass(frozen=True, slots=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


Plan = Callable[[int, Received], Answer]  # (how many came before, the request) -> answer


def always(answer: Answer) -> Plan:
    return lambda _count, _request: answer


def failing_first(failures: int, failure: Answer | None = None) -> Plan:
    """``failures`` answers of 500 (or ``failure``), then 200s."""
    bad = failure or Answer(500, b"boom")
    return lambda count, _request: bad if count < failures else Answer()


class Receiver:
    def __init__(self, plan: Plan | None = None) -> None:
        self.plan: Plan = plan or always(Answer())
        self.requests: list[Received] = []
        self._server: asyncio.Server | None = None
        self.port = 0
        self._arrived = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Until ``count`` requests have arrived; fails with how many did."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.requests) < count:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"{len(self.requests)} of {count} webhook requests came") from None
        return self.requests

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            received = Received(method, path, headers, body)
            answer = self.plan(len(self.requests), received)
            self.requests.append(received)
            self._arrived.set()
            if answer.delay:
                await asyncio.sleep(answer.delay)
            extra = "".join(f"{k}: {v}\r\n" for k, v in answer.headers.items())
            writer.write(
                f"HTTP/1.1 {answer.status} X\r\ncontent-length: {len(answer.body)}\r\n"
                f"connection: close\r\n{extra}\r\n".encode()
                + answer.body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
