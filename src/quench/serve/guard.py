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
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        deadline = loop.time() + self.config.timeout_s
        scope[DEADLINE] = deadline
        info: dict[str, Any] = {"model": None, "batch": None}
        scope[LOG] = info
        status = 500
        started = hijacked = gone = body_done = False
        received = 0

        async def send_(msg: Message) -> None:
            nonlocal status, started
            if hijacked or gone:
                return
            if msg["type"] == "http.response.start":
                status, started = msg["status"], True
                if scope.get(CLOSING):
                    msg = {**msg, "headers": [*msg.get("headers", []), (b"connection", b"close")]}
            await send(msg)

        async def answer(code: int, message: str) -> None:
            """Answer now, close the connection, and let the app see a disconnect."""
            nonlocal hijacked
            if started:
                hijacked = True
                return
            body = json.dumps({"error": message}).encode()
            await send_(
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
            await send_({"type": "http.response.body", "body": body})
            hijacked = True

        def too_large() -> str:
            return f"request body over {self.limit:,} bytes"

        async def receive_() -> Message:
            nonlocal received, gone, body_done
            if hijacked or gone:
                return {"type": "http.disconnect"}
            if body_done:  # e.g. a response listening for the client going away
                return await receive()
            try:
                msg = await within(max(deadline - loop.time(), 0.0), receive())
            except asyncio.TimeoutError:
                secs = f"{self.config.timeout_s:g}"
                await answer(408, f"request body not received within {secs} s")
                return {"type": "http.disconnect"}
            if msg["type"] == "http.disconnect":
                gone = not started
                return msg
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if received > self.limit:
                    await answer(413, too_large())
                    return {"type": "http.disconnect"}
            return msg

        async def drain() -> None:
            """Read an over-limit body for a moment, so the client is listening for the 413."""
            end = min(loop.time() + DRAIN_SECONDS, deadline)
            total = 0
            while total <= DRAIN_LIMIT:
                try:
                    msg = await within(max(end - loop.time(), 0.0), receive())
                except asyncio.TimeoutError:
                    return
                total += len(msg.get("body", b""))
                if msg["type"] != "http.request" or not msg.get("more_body", False):
                    return

        headers = scope.get("headers") or []
        length = dict(headers).get(b"content-length")
        head = len(scope.get("raw_path") or b"") + sum(len(k) + len(v) + 4 for k, v in headers)
        try:
            if head > MAX_HEADER_BYTES:  # h11 bounds only headers that arrive in pieces
                await answer(431, f"request line and headers over {MAX_HEADER_BYTES:,} bytes")
            elif length is not None and length.isdigit() and int(length) > self.limit:
                if int(length) <= DRAIN_LIMIT:
                    await drain()
                await answer(413, too_large())
            elif (found := self.infer and self.infer.match(scope)) is not None:
                await self.infer(scope, receive_, send_, *found)  # type: ignore[misc]
            else:
                await self.app(scope, receive_, send_)
        except Exception:
            if not (hijacked or gone):
                raise
        finally:
            if gone:
                status = CLIENT_CLOSED
            route = scope.get("route")
            endpoint = scope.get(ENDPOINT) or getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - t0
            log = {**info, "path": scope["path"]} if self.log else None
            self.metrics.answered(endpoint, scope["method"], status, elapsed, log)
