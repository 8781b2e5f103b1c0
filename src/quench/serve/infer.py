"""The v2 HTTP infer endpoint: body -> tensor -> batcher -> response, within the deadline.

``Work`` holds what each request does (decode, queue for the engine, encode) and is shared by
the FastAPI routes (``/classify``; the infer routes, which describe the endpoint in OpenAPI)
and ``InferPath``, the lean ASGI handler ``Guard`` answers ``POST .../infer`` with. Profiled under
16 binary-tensor clients, FastAPI's middleware stack, routing, ``Request`` and ``Response``
cost the event loop more than the request's own work; the path below reads the body, answers
and reports errors exactly as the routes do, without them.

A binary-tensor request (small JSON header) is decoded, and a binary or small response
encoded, on the event loop itself: that work takes microseconds, a hop to a decode thread and
back costs more. Large JSON tensors still go to the bounded decode pool.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from starlette.types import Receive, Scope, Send

from quench.serve.api import HEADER_LENGTH, ClassifierAPI, InferRequest
from quench.serve.config import ServeConfig
from quench.serve.deadline import within
from quench.serve.decoding import DecodePool
from quench.serve.errors import ServeError

DEADLINE = "quench.deadline"  # scope key: loop time by which the request must be answered
ENDPOINT = "quench.endpoint"  # scope key: the endpoint (route template) for metrics
LOG = "quench.log"  # scope key: the access log's fields (model, batch)
LARGE_JSON = 1024 * 1024  # an /infer body over this leaves enough freed heap to trim
INLINE_JSON = 16 * 1024  # a JSON part up to this is decoded on the event loop
INLINE_VALUES = 4096  # a JSON response of up to this many numbers is encoded on the loop
_HEADER = HEADER_LENGTH.lower().encode()


class Work:
    """Decode, run and encode one request, each step bounded by the request's deadline."""

    def __init__(self, config: ServeConfig, decoder: DecodePool) -> None:
        self.config = config
        self.decoder = decoder

    def remaining(self, scope: Scope) -> float:
        """Seconds left before the request's deadline (``timeout_s`` after its headers)."""
        deadline = scope.get(DEADLINE)
        if deadline is None:  # not behind Guard (never in practice)
            return self.config.timeout_s
        return max(deadline - asyncio.get_running_loop().time(), 0.0)

    def late(self, what: str) -> ServeError:
        return ServeError(504, f"{what}: no answer within {self.config.timeout_s:g} s")

    async def decode(self, scope: Scope, fn: Any, *args: Any, large: bool) -> Any:
        try:
            return await self.decoder.run(fn, *args, timeout=self.remaining(scope), large=large)
        except asyncio.TimeoutError:
            raise self.late("decoding the request") from None

    async def run(self, scope: Scope, s: Any, x: Any) -> Any:
        """``x`` through the model's batcher: its outputs (noted in the access log)."""
        info = scope.get(LOG)
        if isinstance(info, dict):
            info["model"] = s.api.name
        try:
            y, batch = await within(self.remaining(scope), s.batcher.submit(x))
        except asyncio.TimeoutError:
            raise self.late(f"model {s.api.name!r}") from None
        except ServeError:
            raise
        except Exception as exc:
            raise ServeError(500, f"model {s.api.name!r}: inference failed: {exc}") from None
        if isinstance(info, dict):
            info["batch"] = batch
        return y

    async def infer(
        self, scope: Scope, s: Any, body: bytes, header_length: str | None
    ) -> tuple[bytes, dict[str, str]]:
        """A v2 infer request's body -> the response body and headers."""
        api: ClassifierAPI = s.api
        json_part = len(body)
        if header_length is not None and header_length.isdigit():
            json_part = min(int(header_length), len(body))
        if json_part <= INLINE_JSON:
            req = api.decode_infer(body, header_length)
        else:
            req = await self.decode(
                scope, api.decode_infer, body, header_length, large=len(body) > LARGE_JSON
            )
        y = await self.run(scope, s, req.x)
        if _inline_encode(req, y.size):
            return api.encode_infer(req, y)
        return await asyncio.to_thread(api.encode_infer, req, y)


def _inline_encode(req: InferRequest, values: int) -> bool:
    return req.binary_output or values <= INLINE_VALUES


def error_body(exc: ServeError) -> bytes:
    return json.dumps({"error": exc.message}).encode()


class InferPath:
    """``POST /v2/models/{name}[/versions/{version}]/infer`` as a plain ASGI handler."""

    PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")

    def __init__(self, served: dict[str, Any], work: Work, lookup: Any) -> None:
        self.served = served
        self.work = work
        self.lookup = lookup

    def match(self, scope: Scope) -> tuple[str, str | None] | None:
        if scope["method"] != "POST":
            return None
        m = self.PATH.fullmatch(scope["path"])
        return (m.group(1), m.group(2)) if m else None

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None
    ) -> None:
        scope[ENDPOINT] = (
            "/v2/models/{name}/versions/{version}/infer" if version else "/v2/models/{name}/infer"
        )
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return  # the client went away, or Guard has answered (408, 413)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        header_length = None
        for key, value in scope["headers"]:
            if key == _HEADER:
                header_length = value.decode("latin-1")
        try:
            s = self.lookup(self.served, name, version)
            content, headers = await self.work.infer(scope, s, body, header_length)
            status = 200
        except ServeError as exc:
            content, status = error_body(exc), exc.status
            headers = {"Content-Type": "application/json", **exc.headers}
        except Exception as exc:
            # a bug, not a bad request: the client gets JSON, the traceback goes to the log
            reason = " ".join(f"internal error: {type(exc).__name__}: {exc}".split())
            await _respond(send, 500, error_body(ServeError(500, reason[:500])), {})
            raise
        await _respond(send, status, content, headers)


async def _respond(send: Send, status: int, content: bytes, headers: dict[str, str]) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if not any(k == b"content-type" for k, _ in raw):
        raw.append((b"content-type", b"application/json"))
    raw.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})
