"""uvicorn's HTTP/1.1 protocol with the two limits it lacks: a deadline for the request line and
headers, and a cap on open connections.

uvicorn times out only idle keep-alive connections *after* a response; a client that connects and
sends nothing, or half a header line now and then, holds its connection (and a file descriptor)
for ever, and ``limit_concurrency`` answers 503 only once a request has fully arrived. Neither is
an ASGI matter (no application code runs before the headers are complete), so both live here, in
a subclass of the protocol uvicorn itself uses (h11) rather than in a server of our own.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from bonetumor.serve.guard import ServeLimits


def _raw_response(status: int, reason: str, text: str) -> bytes:
    """A complete response written before any request was parsed (h11 cannot answer one it has not read)."""
    body = text.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def create_protocol(limits: ServeLimits) -> type[H11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` enforcing ``limits``' header timeout
    and connection cap."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                self.logger.warning("refused a connection: %d are open (--max-connections)", len(self.connections) - 1)
                transport.write(_raw_response(503, "Service Unavailable", "too many open connections; try again\n"))
                transport.close()
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
