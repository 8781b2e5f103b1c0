"""The outermost ASGI layer of the HTTP app: deadline, body limits, metrics, access log."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from quench.serve.config import ServeConfig
from quench.serve.deadline import within
from quench.serve.infer import DEADLINE, ENDPOINT, LOG, InferPath
from quench.serve.metrics import Metrics
from quench.serve.protocol import CLOSING, MAX_HEADER_BYTES

DRAIN_LIMIT = 64 * 1024 * 1024  # over-limit bodies up to this size are read before the 413 ...
DRAIN_SECONDS = 1.0  # ... for at most this long
CLIENT_CLOSED = 499  # status counted (not sent) when the client went away mid-request


class Guard:
    """Outermost ASGI layer: the request deadline and body limits, metrics and the access log.

    Each request must be answered ``timeout_s`` after its headers: a body not received by then
    is answered 408 (and the connection closed); the routes use what is left for decoding,
    queueing and inference (504). A body over ``max_body_mb`` is answered 413. A client that
    goes away before its answer is counted as status 499 (nothing is sent, nothing is logged as
    an error). While the server shuts down, responses carry ``Connection: close``.
    ``POST .../infer`` goes to ``infer`` (see ``quench.serve.infer``), the rest to ``app``.
    """

    def __init__(
        self,
        app: FastAPI,
        config: ServeConfig,
        metrics: Metrics,
        infer: InferPath | None = None,
        log: bool = True,
    ) -> None:
        self.app = app
        self.infer = infer
        self.config = config
        self.limit = config.max_body_bytes
        self.metrics = metrics
        self.log = log

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        r = _Exchange(self.config.timeout_s, self.limit, receive, send, scope)
        scope[DEADLINE] = r.deadline
        info: dict[str, Any] = {"model": None, "batch": None}
        scope[LOG] = info
        try:
            await self._dispatch(scope, r)
        except Exception:
            if not (r.hijacked or r.gone):
                raise
        finally:
            status = CLIENT_CLOSED if r.gone else r.status
            route = scope.get("route")
            endpoint = scope.get(ENDPOINT) or getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - t0
            log = {**info, "path": scope["path"]} if self.log else None
            self.metrics.answered(endpoint, scope["method"], status, elapsed, log)

    async def _dispatch(self, scope: Scope, r: _Exchange) -> None:
        """Refuse oversized headers or a declared body over the limit; else ``infer`` or
        ``app``, through the exchange's deadline and limits."""
        headers = scope.get("headers") or []
        length = dict(headers).get(b"content-length")
        head = len(scope.get("raw_path") or b"") + sum(len(k) + len(v) + 4 for k, v in headers)
        if head > MAX_HEADER_BYTES:  # h11 bounds only headers that arrive in pieces
            await r.answer(431, f"request line and headers over {MAX_HEADER_BYTES:,} bytes")
        elif length is not None and length.isdigit() and int(length) > self.limit:
            if int(length) <= DRAIN_LIMIT:
                await r.drain()
            await r.answer(413, r.too_large())
        elif (found := self.infer and self.infer.match(scope)) is not None:
            await self.infer(scope, r.receive, r.send, *found)  # type: ignore[misc]
        else:
            await self.app(scope, r.receive, r.send)


class _Exchange:
    """One HTTP request under ``Guard``: its deadline, the body received so far, what was sent
    (the status counted), and whether Guard answered it itself (``hijacked``: the app then
    sees a disconnect) or the client went away (``gone``)."""

    def __init__(
        self, timeout_s: float, limit: int, receive: Receive, send: Send, scope: Scope
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout_s = timeout_s
        self.deadline = self.loop.time() + timeout_s
        self.limit = limit
        self._receive = receive
        self._send = send
        self.scope = scope
        self.status = 500
        self.started = self.hijacked = self.gone = self.body_done = False
        self.received = 0

    def too_large(self) -> str:
        return f"request body over {self.limit:,} bytes"

    async def send(self, msg: Message) -> None:
        if self.hijacked or self.gone:
            return
        if msg["type"] == "http.response.start":
            self.status, self.started = msg["status"], True
            if self.scope.get(CLOSING):
                msg = {**msg, "headers": [*msg.get("headers", []), (b"connection", b"close")]}
        await self._send(msg)

    async def answer(self, code: int, message: str) -> None:
        """Answer now, close the connection, and let the app see a disconnect."""
        if self.started:
            self.hijacked = True
            return
        body = json.dumps({"error": message}).encode()
        await self.send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": body})
        self.hijacked = True

    async def receive(self) -> Message:
        if self.hijacked or self.gone:
            return {"type": "http.disconnect"}
        if self.body_done:  # e.g. a response listening for the client going away
            return await self._receive()
        try:
            msg = await within(max(self.deadline - self.loop.time(), 0.0), self._receive())
        except asyncio.TimeoutError:
            await self.answer(408, f"request body not received within {self.timeout_s:g} s")
            return {"type": "http.disconnect"}
        if msg["type"] == "http.disconnect":
            self.gone = not self.started
            return msg
        if msg["type"] == "http.request":
            self.received += len(msg.get("body", b""))
            self.body_done = not msg.get("more_body", False)
            if self.received > self.limit:
                await self.answer(413, self.too_large())
                return {"type": "http.disconnect"}
        return msg

    async def drain(self) -> None:
        """Read an over-limit body for a moment, so the client is listening for the 413."""
        end = min(self.loop.time() + DRAIN_SECONDS, self.deadline)
        total = 0
        while total <= DRAIN_LIMIT:
            try:
                msg = await within(max(end - self.loop.time(), 0.0), self._receive())
            except asyncio.TimeoutError:
                return
            total += len(msg.get("body", b""))
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                return
