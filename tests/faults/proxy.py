"""A TCP proxy the fault tests own, to break connections the way a network does.

``cut()`` drops every live connection at once, in both directions, with a reset (no
FIN, nothing flushed), while new connections are still accepted: what a NAT or
firewall forgetting its state, or a server crashing, looks like to a client.
``pause()`` makes the server unreachable (new connections are refused and the live
ones are cut) until ``resume()`` listens again on the same port. ``freeze()`` is the
other kind of partition: bytes stop flowing (one way or both) while every socket stays
open, so neither side sees an error, only silence, until ``thaw()`` lets the held bytes
through. ``drop_reply_to()`` loses the reply to one request: the server did the work,
the client never hears.

Point a process's ``DATABASE_URL`` or ``AMQP_URL`` at ``proxy.port`` instead of the
server's. The proxy runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 64 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST: SO_LINGER 0 drops unsent data instead of flushing it."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.pumps: list[asyncio.Task[None]] = []
        self.drop_next_reply = False

    def reset(self) -> None:
        for pump in self.pumps:
            pump.cancel()
        _reset(self.client)
        _reset(self.upstream)


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._marker: bytes | None = None
        self.reply_dropped = asyncio.Event()
        # Set while bytes flow that way: to the server (True), to the client (False).
        self._flowing = {True: asyncio.Event(), False: asyncio.Event()}
        for flowing in self._flowing.values():
            flowing.set()

    @classmethod
    def to_url(cls, url: str) -> TcpProxy:
        """A proxy to the host and port of ``url`` (a postgresql:// or amqp:// URL)."""
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None, url
        return cls(parts.hostname, parts.port)

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by this proxy's."""
        parts = urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@" if credentials else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}"))

    @property
    def live(self) -> int:
        """Connections open through the proxy right now."""
        return len(self._links)

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        if self._server is None:
            # pause() ran while this connection was being made: it must not outlive it.
            _reset(writer)
            up_writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.pumps = [
            asyncio.create_task(self._pump(reader, up_writer, link, upstream=True)),
            asyncio.create_task(self._pump(up_reader, writer, link, upstream=False)),
        ]

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        upstream: bool,
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                if upstream and self._marker is not None and self._marker in data:
                    self._marker = None
                    link.drop_next_reply = True
                elif not upstream and link.drop_next_reply:
                    self._links.discard(link)
                    self.reply_dropped.set()
                    link.reset()
                    return
                await self._flowing[upstream].wait()  # freeze(): hold it, close nothing
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return  # cut(): the link is being reset
        # One side closed or failed: close both, as a plain TCP relay would.
        if link in self._links:
            self._links.discard(link)
            for pump in link.pumps:
                if pump is not asyncio.current_task():
                    pump.cancel()
            for side in (link.client, link.upstream):
                side.transport.abort()

    def cut(self) -> int:
        """Reset every live connection (both directions); keep accepting. Returns how many."""
        links, self._links = self._links, set()
        for link in links:
            link.reset()
        return len(links)

    @property
    def frozen(self) -> bool:
        return not all(flowing.is_set() for flowing in self._flowing.values())

    def freeze(self, direction: str = "both") -> int:
        """Stop forwarding bytes ``"up"`` (client to server), ``"down"`` (server to
        client) or ``"both"`` ways, on live and new connections, closing nothing: what
        a stalled link looks like. Returns how many connections were live."""
        assert direction in ("up", "down", "both"), direction
        if direction in ("up", "both"):
            self._flowing[True].clear()
        if direction in ("down", "both"):
            self._flowing[False].clear()
        return len(self._links)

    def thaw(self) -> None:
        """Forward again; the bytes held meanwhile go through in order."""
        for flowing in self._flowing.values():
            flowing.set()

    def drop_reply_to(self, marker: bytes) -> None:
        """Once: the first request carrying ``marker`` reaches the server, and then its
        connection is reset the moment the reply comes back, which never arrives. Sets
        ``reply_dropped``. (Postgres replies to an autocommit statement after its commit:
        the client does not know that its statement took effect.)"""
        self.reply_dropped.clear()
        self._marker = marker

    async def pause(self) -> int:
        """Refuse new connections and cut the live ones; returns how many were cut."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        dropped = self.cut()
        if server is not None:
            await server.wait_closed()
        return dropped

    async def resume(self) -> None:
        """Listen again, on the same port."""
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        self.thaw()
        await self.pause()
