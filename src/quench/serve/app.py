"""The ASGI app: KServe v2 routes, classify, metrics, limits, access log, lifespan."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from quench import __version__
from quench.serve.api import HEADER_LENGTH, VERSION, ClassifierAPI
from quench.serve.batcher import Batcher
from quench.serve.config import ServeConfig
from quench.serve.errors import ServeError
from quench.serve.metrics import CONTENT_TYPE_LATEST, Metrics

if TYPE_CHECKING:
    from quench.model import Model

DRAIN_LIMIT = 64 * 1024 * 1024  # over-limit bodies up to this size are read before the 413
EXTENSIONS = ["binary_tensor_data", "model_repository"]  # model_repository: index only


class Served:
    """A model's API and batcher."""

    def __init__(self, api: ClassifierAPI, batcher: Batcher) -> None:
        self.api = api
        self.batcher = batcher
        self.ready = False


def create_app(models: Sequence[Model], config: ServeConfig | None = None) -> ASGIApp:
    """An ASGI app serving ``models`` (KServe v2 REST + /classify + /metrics)."""
    config = config or ServeConfig()
    if not models:
        raise ValueError("no models to serve")
    if config.name and len(models) > 1:
        raise ValueError("a served name (--name) needs exactly one model")
    metrics = Metrics()
    served: dict[str, Served] = {}
    for m in models:
        api = ClassifierAPI(m, config.name)
        if api.name in served:
            raise ValueError(f"two models are named {api.name!r}; serve them separately")
        batcher = Batcher(
            api.name,
            api.predict,
            api.max_batch(config.max_batch),
            config.max_delay_ms / 1000.0,
            config.max_queue,
            metrics,
        )
        served[api.name] = Served(api, batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for s in served.values():
            await s.batcher.run_on_engine(s.api.setup)
            s.ready = True
        yield
        for s in served.values():
            s.ready = False
        # uvicorn has already answered in-flight requests; drain anything still queued
        await asyncio.gather(*(s.batcher.close() for s in served.values()))

    app = FastAPI(title="quench", version=__version__, lifespan=lifespan, openapi_url=None)
    app.state.served = served
    app.state.config = config
    app.state.metrics = metrics

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> Response:
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    def get(name: str, version: str | None = None) -> Served:
        s = served.get(name)
        if s is None:
            raise ServeError(404, f"unknown model {name!r}; serving {sorted(served)}")
        if version not in (None, "", VERSION):
            raise ServeError(404, f"model {name!r} has no version {version!r} (only {VERSION!r})")
        return s

    def note(request: Request, **fields: Any) -> None:
        info = request.scope.get("quench.log")
        if isinstance(info, dict):
            info.update(fields)

    async def run(request: Request, s: Served, x: Any) -> Any:
        note(request, model=s.api.name)
        try:
            y, batch = await asyncio.wait_for(s.batcher.submit(x), config.timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(
                504, f"model {s.api.name!r}: no answer within {config.timeout_s:g} s"
            ) from None
        except ServeError:
            raise
        except Exception as exc:
            raise ServeError(500, f"model {s.api.name!r}: inference failed: {exc}") from None
        note(request, batch=batch)
        return y

    # -- health / metadata ------------------------------------------------------------------
    @app.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        ok = all(s.ready for s in served.values())
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return JSONResponse({"name": "quench", "version": __version__, "extensions": EXTENSIONS})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return JSONResponse(get(name, version).api.metadata())

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        s = get(name, version)
        if not s.ready:
            return JSONResponse({"error": f"model {name!r} is not ready"}, 503)
        return JSONResponse({"name": name, "ready": True})

    @app.post("/v2/repository/index")
    async def repository_index() -> Response:
        return JSONResponse(
            [
                {"name": n, "version": VERSION, "state": "READY" if s.ready else "UNAVAILABLE"}
                for n, s in served.items()
            ]
        )

    # -- inference --------------------------------------------------------------------------
    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        s = get(name, version)
        body = await request.body()
        req = await asyncio.to_thread(s.api.decode_infer, body, request.headers.get(HEADER_LENGTH))
        y = await run(request, s, req.x)
        content, headers = await asyncio.to_thread(s.api.encode_infer, req, y)
        return Response(content, 200, headers=headers)

    @app.post("/v2/models/{name}/classify")
    async def classify(request: Request, name: str, topk: str = "5") -> Response:
        s = get(name)
        try:
            k = int(topk)
            if k < 1:
                raise ValueError
        except ValueError:
            raise ServeError(400, f"topk must be an integer >= 1, got {topk!r}") from None
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            files = [v for v in form.values() if isinstance(v, UploadFile)]
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                upload = files[0] if files else None
            if upload is None:
                raise ServeError(400, "multipart request has no file field (use 'file')")
            data = await upload.read()
        else:
            data = await request.body()
        if not data:
            raise ServeError(400, "empty request body: send the encoded image")
        x = await asyncio.to_thread(s.api.decode_image, data)
        y = await run(request, s, x)
        return JSONResponse(s.api.encode_classify(y, k))

    @app.get("/metrics")
    async def prometheus() -> Response:
        for n, s in served.items():
            metrics.queue_depth.labels(n).set(s.batcher.depth)
        return Response(metrics.render(), 200, media_type=CONTENT_TYPE_LATEST)

    return Guard(app, config.max_body_bytes, metrics, log=not config.quiet)


class _Hijacked(Exception):
    pass


class Guard:
    """Outermost ASGI layer: body size limit (413), metrics and the JSON access log."""

    def __init__(self, app: FastAPI, limit: int, metrics: Metrics, log: bool = True) -> None:
        self.app = app
        self.limit = limit
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
        info: dict[str, Any] = {"model": None, "batch": None}
        scope["quench.log"] = info
        status = 500
        started = False
        hijacked = False

        async def send_(msg: Message) -> None:
            nonlocal status, started
            if hijacked:
                return
            if msg["type"] == "http.response.start":
                status, started = msg["status"], True
            await send(msg)

        async def too_large() -> None:
            nonlocal hijacked
            body = json.dumps({"error": f"request body over {self.limit:,} bytes"}).encode()
            await send_(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send_({"type": "http.response.body", "body": body})
            hijacked = True

        received = 0

        async def receive_() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    if not started:
                        await too_large()
                    return {"type": "http.disconnect"}
            return msg

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > self.limit:
                if int(length) <= DRAIN_LIMIT:  # read it, so the client sees the 413
                    while (await receive()).get("more_body", False):
                        pass
                await too_large()
            else:
                await self.app(scope, receive_, send_)
        except Exception:
            if not hijacked:
                raise
        finally:
            elapsed = time.perf_counter() - t0
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(elapsed)
            if self.log:
                line = {
                    "ts": round(time.time(), 3),
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "ms": round(elapsed * 1000, 2),
                    "model": info["model"],
                    "batch": info["batch"],
                }
                sys.stderr.write(json.dumps(line) + "\n")
