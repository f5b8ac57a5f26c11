"""What every request passes before the application sees it: the Host, the token, the size and
pace of its body, and the security headers on every answer.

``Guard`` is plain ASGI rather than a Starlette ``BaseHTTPMiddleware`` because it has to act on
the body *as it arrives*: a request is refused by its headers (wrong Host, no token, a declared
size over the limit) before one byte of its body is read, and a chunked body is counted as it
streams and cut off at the limit, not spooled whole and measured afterwards. The Host check is
Starlette's ``TrustedHostMiddleware``; the pace of the request line and headers, which no ASGI
code sees, is watched by the server's protocol (serve/protocol.py).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field

import anyio
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
MULTIPART_ALLOWANCE = 64 * 1024  # the form's boundaries and part headers around the file itself

# The page loads only its own script, style and the heatmaps (data: PNGs); nothing may frame it.
# Swagger UI (/docs) starts itself with an inline script, so its pages allow inline code.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer",
                    "cross-origin-opener-policy": "same-origin", "cross-origin-resource-policy": "same-origin",
                    "permissions-policy": "camera=(), microphone=(), geolocation=()"}


@dataclass(frozen=True)
class ServeLimits:
    """How much and how long one client may take (the ``serve`` command's options)."""

    max_upload_mb: float = 50.0
    header_timeout: float = 10.0  # from the connection's first byte to the end of its request headers
    body_timeout: float = 30.0  # the longest silence while a request body is being sent
    request_timeout: float = 120.0  # headers received -> answer sent, waiting for the model included
    max_connections: int = 512  # open at once; more get 503 and are closed
    allowed_hosts: tuple[str, ...] = field(default=LOOPBACK_HOSTS)

    @property
    def max_body(self) -> int:
        return int(self.max_upload_mb * 2**20) + MULTIPART_ALLOWANCE


def security_headers(path: str) -> dict[str, str]:
    """The headers every answer carries; API answers (patient images) are never cached."""
    docs = path.startswith(("/docs", "/redoc"))
    headers = {**SECURITY_HEADERS, "content-security-policy": DOCS_CSP if docs else PAGE_CSP}
    if path.startswith("/api/"):
        headers["cache-control"] = "no-store"
    return headers


class Guard:
    """ASGI middleware: Host, token and declared size checked before the body is read; the body
    counted and timed as it streams; security headers added to every response."""

    def __init__(self, app: ASGIApp, limits: ServeLimits, token: str | None = None):
        self.app, self.limits, self.token = app, limits, token
        self.hosts = TrustedHostMiddleware(self._checked, allowed_hosts=list(limits.allowed_hosts), www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = [(k.encode(), v.encode()) for k, v in security_headers(scope["path"]).items()]

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.hosts(scope, receive, secured)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        deadline = time.monotonic() + self.limits.request_timeout
        headers = Headers(scope=scope)
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            return await _reply(send, *refusal)
        scope.setdefault("state", {})["deadline"] = deadline  # the model work stops at it too (app.py)
        body = _Body(receive, send, self.limits, deadline)
        try:
            await self.app(scope, body.receive, body.send)
        except Exception:
            if not body.answered:  # the application's own failure: the server's error handler answers
                raise
            # else the client was already answered (408/413) and the app saw a disconnect: nothing to add

    def _refusal(self, path: str, headers: Headers) -> tuple[int, str, dict[str, str]] | None:
        if self.token is not None and path.startswith("/api/"):
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.token.encode()):
                return 401, "missing or wrong bearer token", {"www-authenticate": "Bearer"}
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body:
            return 413, _too_large(int(length), self.limits), {}
        return None


class _Body:
    """The request body as the application reads it: each wait bounded by the body timeout and
    the request's deadline, the running total by the size limit. On a breach the client gets
    408 or 413 at once and the application sees a disconnect."""

    def __init__(self, receive: Receive, send: Send, limits: ServeLimits, deadline: float):
        self._receive, self._send, self.limits, self.deadline = receive, send, limits, deadline
        self.received, self.started, self.answered = 0, False, False

    async def receive(self) -> Message:
        if self.answered:
            return {"type": "http.disconnect"}
        wait = min(self.limits.body_timeout, self.deadline - time.monotonic())
        message = None
        with anyio.move_on_after(max(wait, 0)):
            message = await self._receive()
        if message is None:
            late = wait < self.limits.body_timeout
            return await self._refuse(408, f"the request took longer than {self.limits.request_timeout:g} s" if late else
                                      f"the request body stalled for {self.limits.body_timeout:g} s")
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limits.max_body:
                return await self._refuse(413, _too_large(None, self.limits))
        return message

    async def send(self, message: Message) -> None:
        if self.answered:  # the client already has its 408/413
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)

    async def _refuse(self, status: int, detail: str) -> Message:
        if not self.started:
            await _reply(self._send, status, detail, {})
        self.answered = True
        return {"type": "http.disconnect"}


def _too_large(length: int | None, limits: ServeLimits) -> str:
    size = f"{length / 2**20:.1f} MB; " if length is not None else ""
    return f"upload too large: {size}the limit is {limits.max_upload_mb:g} MB"


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    """A JSON error that also closes the connection: an unread body is never read afterwards."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close"), *((k.encode(), v.encode()) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
