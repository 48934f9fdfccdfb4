"""What a connection may cost the api before a request reaches the app (and its API key
check): the size of a request head, and how long the server waits for a head, a body,
or the next request on a kept-alive connection.

uvicorn's httptools protocol bounds none of the first three. llhttp buffers a header
line for as long as it grows, and nothing closes a connection that has not finished its
head, so one client could hold as much memory as it sent in one endless header, or
every file descriptor with idle and half-sent connections. ``LimitedHttpToolsProtocol`` is
that protocol with the bounds added:

- a head (request line and headers) larger than ``max_header_bytes`` is answered 431 and
  the connection closed; the parser holds at most that plus a read or two (250 KB);
- a head must arrive complete within ``header_timeout``: counted from the connection's
  opening for its first request (so an idle new connection is closed then, silently),
  and from the head's first byte for a later one (until then the connection is idle
  and ``keep_alive_timeout`` applies); a half-sent head is answered 408 and closed;
- a body must arrive complete within ``body_timeout`` of its head; past it the app sees
  the client as gone, and the client gets a 408 if no response has started.

Neither deadline runs out while uvicorn itself has stopped reading the connection (a
pipelined request queued behind one still running, or a body the app has not read
yet): the bytes then wait on the server, and a 408 would also have gone out as the
answer to the earlier request.

The concurrency cap is uvicorn's own ``limit_concurrency`` (``api.__main__``). The
httptools parser is kept, not swapped for h11 (which bounds a head, but not its time):
h11's protocol costs four times httptools' CPU a request (figures in README, "Authentication and
limits"). On the hot path the limits are a few attribute writes per request; a timer
is armed per connection, and per request only when its head or body spans reads.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    keep_alive_timeout: float


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded head size and head and body deadlines.

    uvicorn builds one per connection. The parser calls back on_message_begin (first
    byte of a request), on_headers_complete and on_message_complete from inside
    ``data_received``; the phase they leave behind decides what is counted and timed.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        # uvicorn's own keep-alive timer, armed after each response, reads this.
        self.timeout_keep_alive = limits.keep_alive_timeout  # type: ignore[assignment]
        # Between a request's end (or the connection's start) and its next head's end.
        self._reading_head = True
        self._head_begun = False  # a byte of that head has arrived
        self._head_bytes = 0
        self._heads_read = 0
        self._body_pending = False
        self._head_deadline: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        self._cancel_body_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        was_reading_head, heads_read = self._reading_head, self._heads_read
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._reading_head:
            if was_reading_head and heads_read == self._heads_read:
                # No head ended in this read, so all of it belongs to the one being read.
                # (A head that begins mid-read, after a pipelined request, is counted
                # from the next read: at most one read more than the limit.)
                self._head_bytes += len(data)
                if self._head_bytes > self.limits.max_header_bytes:
                    log.warning(
                        "request head of more than %d bytes from %s: 431",
                        self.limits.max_header_bytes,
                        _peer(self.client),
                    )
                    self._refuse(431, b"Request Header Fields Too Large")
                    return
            if self._head_begun and self._head_deadline is None:
                self._head_deadline = self.loop.call_later(
                    self.limits.header_timeout, self._head_timed_out
                )
        elif self._body_pending and self._body_deadline is None:
            if self.transport.get_protocol() is not self:
                return  # upgraded to a WebSocket: that protocol owns the connection now
            self._body_deadline = self.loop.call_later(
                self.limits.body_timeout, self._body_timed_out
            )

    # Parser callbacks, on top of uvicorn's.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True

    def on_headers_complete(self) -> None:
        self._cancel_head_deadline()
        self._reading_head = False
        self._head_begun = False
        self._head_bytes = 0
        self._heads_read += 1
        self._body_pending = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._cancel_body_deadline()
        self._body_pending = False
        self._reading_head = True

    # Deadlines.

    def _held_by_the_server(self) -> bool:
        """Whether uvicorn has stopped reading this connection (a pipelined request
        waits behind one still running, or the app has not read the body buffered so
        far): bytes the client sent sit unread, so no deadline of the client's runs."""
        return bool(self.flow.read_paused or self.pipeline)

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing():
            return
        if self._held_by_the_server():
            self._head_deadline = self.loop.call_later(
                self.limits.header_timeout, self._head_timed_out
            )
            return
        log.debug("no complete request head from %s in time", _peer(self.client))
        if self._head_begun:
            self._refuse(408, b"Request Timeout")
        else:
            self.transport.close()  # never said a word: nothing to answer

    def _body_timed_out(self) -> None:
        self._body_deadline = None
        if self.transport.is_closing():
            return
        if self._held_by_the_server():
            self._body_deadline = self.loop.call_later(
                self.limits.body_timeout, self._body_timed_out
            )
            return
        log.debug("request body from %s incomplete in time", _peer(self.client))
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # The app waits for the body: from now on it sees a client that left, and
            # anything it sends is dropped, so the 408 below is the only answer.
            cycle.disconnected = True
            cycle.message_event.set()
            self._answer_and_close(408, b"Request Timeout")
        else:
            self.transport.close()

    def _refuse(self, status: int, reason: bytes) -> None:
        """Answer ``status`` and close, unless a response to an earlier (pipelined)
        request is under way: a second one would interleave with it, so just close."""
        if self.cycle is None or self.cycle.response_complete:
            self._answer_and_close(status, reason)
        else:
            self.transport.close()

    def _answer_and_close(self, status: int, reason: bytes) -> None:
        headers = b"".join(
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        )
        self.transport.write(
            STATUS_LINE[status]
            + headers
            + b"content-type: text/plain; charset=utf-8\r\n"
            + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(reason)
            + reason
        )
        self.transport.close()

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _cancel_body_deadline(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown peer"


def limited_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """What to pass as ``uvicorn.run(http=...)``.

    uvicorn builds protocols with ``http(config=..., server_state=..., ...)``, which a
    partial serves as well as a class, and unlike a class made here it pickles for the
    worker processes of ``API_WORKERS`` > 1. uvicorn's signature asks for a type.
    """
    return cast(
        "type[asyncio.Protocol]", functools.partial(LimitedHttpToolsProtocol, limits=limits)
    )
