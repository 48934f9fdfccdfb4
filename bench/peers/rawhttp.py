"""A minimal HTTP/1.1 keep-alive client for the open-loop latency run over HTTP.

The latency is measured from just before the POST, so the client's own cost is inside
the figure; httpx spends about a millisecond of CPU a request on this box (its pool,
its models), on the same two cores as the api, the relay and the consumer, and queues
behind itself at 200 requests a second. This client writes a prepared request on an
idle kept-alive connection and reads the answer by its Content-Length, no more.
"""

from __future__ import annotations

import asyncio
import contextlib


class KeepAliveClient:
    def __init__(self, host: str, port: int, connections: int = 64) -> None:
        self._host, self._port, self._size = host, port, connections
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self._all: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> KeepAliveClient:
        for _ in range(self._size):
            reader, writer = await asyncio.open_connection(self._host, self._port)
            self._all.append(writer)
            self._idle.put_nowait((reader, writer))
        return self

    async def __aexit__(self, *_: object) -> None:
        for writer in self._all:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def post_json(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, response body). Waits for an idle connection if all are busy."""
        reader, writer = await self._idle.get()
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            length = next(
                int(line.split(":", 1)[1])
                for line in lines[1:]
                if line.lower().startswith("content-length:")
            )
            return status, await reader.readexactly(length)
        finally:
            self._idle.put_nowait((reader, writer))
