"""uvicorn's HTTP/1.1 protocol with the two limits it lacks, a deadline for the request line and
headers and a cap on open connections, and with a lingering close.

uvicorn times out only idle keep-alive connections *after* a response; a client that connects and
sends nothing, or half a header line now and then, holds its connection (and a file descriptor)
for ever, and ``limit_concurrency`` answers 503 only once a request has fully arrived. Neither is
an ASGI matter (no application code runs before the headers are complete), so both live here, in
a subclass of the protocol uvicorn itself uses (h11) rather than in a server of our own.

A refusal (401, 413, 408, 503) is sent before the client's body is read, and a socket closed with
unread bytes in it, or that receives more after it is closed, makes the kernel send a reset, which
can reach the client before it has read the answer: it sees "connection reset" instead of the 401
or 413 that says why. So, as Apache and nginx do ("lingering close"), a close first sends the
answer and the end of the stream, then reads and drops what the client still sends until it
closes its side, for at most ``LINGER_S``; uvicorn offers no such option.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from bonetumor.serve.guard import ServeLimits

LINGER_S = 2.0  # after the answer: how long a client still sending is read (and dropped) before the socket closes


def _raw_response(status: int, reason: str, text: str) -> bytes:
    """A complete response written before any request was parsed (h11 cannot answer one it has not read)."""
    body = text.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class _LingeringTransport:
    """The transport as uvicorn sees it: ``close()`` is ``protocol``'s lingering close, and a
    lingering connection counts as closing; everything else is passed on."""

    def __init__(self, transport: asyncio.Transport, protocol) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._transport.is_closing() or self._protocol.lingering

    def close(self) -> None:
        self._protocol.close_lingering()


class LingeringH11Protocol(H11Protocol):
    """uvicorn's h11 protocol whose every close is a lingering close (see the module's docstring)."""

    _linger_timer: asyncio.TimerHandle | None = None
    _closing_now = False  # the server is stopping: close at once

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]

    @property
    def lingering(self) -> bool:
        return self._linger_timer is not None

    def data_received(self, data: bytes) -> None:
        if not self.lingering:  # once the answer is sent, what the client still sends is dropped unread
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lingering:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        self._closing_now = True
        if self.lingering:
            self._raw.close()
        else:
            super().shutdown()

    def close_lingering(self) -> None:
        """Send what is buffered and the end of the stream, then read and drop until the
        client closes its side or ``LINGER_S`` passes; only then close the socket."""
        raw = self._raw
        if raw.is_closing() or self.lingering:  # closing already (asyncio closes it when the client ends its side)
            return
        if self._closing_now or not raw.can_write_eof():
            raw.close()
            return
        raw.write_eof()  # after the buffered answer: the client's read ends here
        raw.resume_reading()  # uvicorn may have paused reading while the body waited
        self._linger_timer = self.loop.call_later(LINGER_S, raw.close)


def create_protocol(limits: ServeLimits) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` enforcing ``limits``' header timeout
    and connection cap."""

    class GuardedH11Protocol(LingeringH11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self.logger.warning("refused a connection: %d are open (--max-connections)", len(self.connections) - 1)
                self.transport.write(_raw_response(503, "Service Unavailable", "too many open connections; try again\n"))
                self.transport.close()
                return
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _watch_headers(self) -> None:
            """Armed while a request's headers are awaited (h11's IDLE: none, or only part, has
            arrived), counted from the first byte after the last response; off once they are in."""
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(limits.header_timeout, self._headers_too_slow)
            else:
                self._stop_timer()

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.write(_raw_response(408, "Request Timeout",
                                                   f"request headers not received within {limits.header_timeout:g} s\n"))
                self.transport.close()

    return GuardedH11Protocol
