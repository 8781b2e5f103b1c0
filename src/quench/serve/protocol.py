"""The HTTP/1.1 connection: uvicorn's h11 protocol with the limits an ASGI app cannot set.

What happens before a request reaches the app is answered here, in the app's JSON error format:
an unparsable request (garbage request line, negative or malformed Content-Length, headers over
the size limit) gets ``{"error": ...}`` with h11's status hint (400, 431, 501) instead of
uvicorn's text; a connection that has not sent a complete request line + headers within
``header_timeout_s`` is closed (with a 408 if it sent part of one); a connection beyond
``max_connections`` gets a 503 and is closed at once; and on shutdown the response of a request
still in progress carries ``Connection: close`` (the app adds it, see ``CLOSING``).
"""

from __future__ import annotations

import asyncio
import http
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from quench.serve.config import ServeConfig

CLOSING = "quench.closing"  # scope key: the server is shutting down, close after this response
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11's default)


class _Connection(h11.Connection):
    """An h11 connection that remembers the last protocol error it raised."""

    error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error = exc
            raise


def raw_response(status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete ``Connection: close`` response with a JSON error body."""
    body = json.dumps({"error": message}).encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class QuenchH11Protocol(H11Protocol):
    def __init__(self, *args: Any, limits: ServeConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Connection(h11.SERVER, MAX_HEADER_BYTES)
        self.limits = limits
        self._timer: asyncio.TimerHandle | None = None
        self._waits = 0  # which wait for headers the armed timer belongs to

    # -- limits on connections and on header reading ----------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(
                503,
                f"too many open connections (limit {self.limits.max_connections}); retry later",
                {"retry-after": "1"},
            )
            return
        self._await_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _await_headers(self) -> None:
        self._disarm()
        self._waits += 1
        self._timer = self.loop.call_later(
            self.limits.header_timeout_s, self._headers_late, self._waits
        )

    def _headers_late(self, wait: int) -> None:
        if wait != self._waits or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is in progress: the app's deadline covers it
        if self.conn.trailing_data[0]:
            secs = f"{self.limits.header_timeout_s:g}"
            self._refuse(408, f"request line and headers not received within {secs} s")
        else:
            self.transport.close()

    def _refuse(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._disarm()
        self.transport.write(raw_response(status, message, headers))
        self.transport.close()

    # -- unparsable requests: JSON, not uvicorn's text ------------------------------------
    def send_400_response(self, msg: str) -> None:
        exc = self.conn.error
        status = exc.error_status_hint if exc is not None else 400
        reason = str(exc) if exc is not None and str(exc) else msg
        self._refuse(status, f"invalid HTTP request: {reason}")

    # -- graceful shutdown ------------------------------------------------------------------
    def shutdown(self) -> None:
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope[CLOSING] = True  # type: ignore[typeddict-unknown-key]
        super().shutdown()
