"""The ASGI app: KServe v2 routes, classify, metrics, limits, access log, lifespan.

The wire protocol (routes, status codes, limits, deadlines) lives here and in ``protocol``;
the model API (decode / predict / encode) in ``api``; batching in ``batcher``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from quench import __version__
from quench.serve import schema
from quench.serve.api import HEADER_LENGTH, VERSION, ClassifierAPI
from quench.serve.batcher import Batcher
from quench.serve.config import ServeConfig
from quench.serve.decoding import DecodePool
from quench.serve.errors import ServeError
from quench.serve.guard import Guard
from quench.serve.infer import InferPath, Work
from quench.serve.metrics import CONTENT_TYPE_LATEST, Metrics

if TYPE_CHECKING:
    from quench.model import Model

EXTENSIONS = ["binary_tensor_data", "model_repository"]  # model_repository: index only
OPENAPI_URL = "/openapi.json"


class Served:
    """A model's API and batcher."""

    def __init__(self, api: ClassifierAPI, batcher: Batcher) -> None:
        self.api = api
        self.batcher = batcher
        self.ready = False


def lookup(served: dict[str, Served], name: str, version: str | None = None) -> Served:
    """The served model ``name`` (``version`` empty or the only one), else 404."""
    s = served.get(name)
    if s is None:
        raise ServeError(404, f"unknown model {name!r}; serving {sorted(served)}")
    if version not in (None, "", VERSION):
        raise ServeError(404, f"model {name!r} has no version {version!r} (only {VERSION!r})")
    return s


def _errors(status: int, *more: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: the JSON error body for each status."""
    return {code: {"model": schema.Error} for code in (status, *more)}


ERRORS = _errors(400, 404, 408, 413, 503, 504)


def create_app(
    models: Sequence[Model],
    config: ServeConfig | None = None,
    names: Sequence[str | None] | None = None,
) -> ASGIApp:
    """An ASGI app serving ``models`` (KServe v2 REST + /classify + /metrics).

    ``names``: the served name of each model (None: ``config.name`` for a single model, else
    the artifact's own name).
    """
    config = config or ServeConfig()
    if not models:
        raise ValueError("no models to serve")
    if config.name and len(models) > 1:
        raise ValueError("a served name (--name) needs exactly one model")
    names = list(names) if names is not None else [None] * len(models)
    if len(names) != len(models):
        raise ValueError("one name (or None) per model")
    metrics = Metrics()
    decoder = DecodePool(config.decode_workers)
    served = _serve(models, names, config, metrics)
    app = FastAPI(
        title="quench",
        version=__version__,
        lifespan=_lifespan(served, decoder),
        openapi_url=OPENAPI_URL,
        docs_url=None,
        redoc_url=None,
    )
    app.state.served = served
    app.state.config = config
    app.state.metrics = metrics
    app.state.decoder = decoder
    app.state.before_close = []  # async callables awaited at shutdown before the batchers close
    _error_handlers(app)
    work = Work(config, decoder)
    # the routes in OpenAPI's order
    _health_routes(app, served)
    _infer_routes(app, served, work)
    _classify_route(app, served, work)
    _metrics_route(app, served, metrics)
    app.openapi = _openapi(app, served)  # type: ignore[method-assign]
    return Guard(app, config, metrics, InferPath(served, work, lookup), log=not config.quiet)


def _serve(
    models: Sequence[Model], names: Sequence[str | None], config: ServeConfig, metrics: Metrics
) -> dict[str, Served]:
    """Each model's API and batcher, by served name (two of one name: ValueError)."""
    served: dict[str, Served] = {}
    for m, n in zip(models, names, strict=True):
        api = ClassifierAPI(m, n or config.name, config.max_image_pixels)
        if api.name in served:
            raise ValueError(
                f"two models are named {api.name!r}; name each one: NAME=artifact.quench"
            )
        batcher = Batcher(
            api.name,
            api.predict,
            api.max_batch(config.max_batch),
            config.max_delay_ms / 1000.0,
            config.max_queue,
            metrics,
        )
        served[api.name] = Served(api, batcher)
    return served


def _lifespan(
    served: dict[str, Served], decoder: DecodePool
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Set every model up on its engine thread before serving; at shutdown the before-close
    hooks, then drain the batchers and close the decode pool."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for s in served.values():
            await s.batcher.run_on_engine(s.api.setup)
            s.ready = True
        yield
        for hook in app.state.before_close:  # e.g. the gRPC listener answers its requests
            await hook()
        for s in served.values():
            s.ready = False
        # uvicorn has already answered in-flight requests; drain anything still queued
        await asyncio.gather(*(s.batcher.close() for s in served.values()))
        await asyncio.to_thread(decoder.close)

    return lifespan


def _error_handlers(app: FastAPI) -> None:
    """Every error answers JSON ``{"error": ...}``: ours, Starlette's, validation, bugs."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> Response:
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        found = {}
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()))
            found.setdefault(loc or "request", e.get("msg", "invalid"))
        msg = "; ".join(f"{k}: {v}" for k, v in list(found.items())[:3])
        return JSONResponse({"error": " ".join(f"invalid request: {msg}".split())}, 400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        # a bug, not a bad request: the traceback goes to the log (uvicorn), the client gets JSON
        reason = " ".join(f"internal error: {type(exc).__name__}: {exc}".split())
        return JSONResponse({"error": reason[:500]}, 500)


def _health_routes(app: FastAPI, served: dict[str, Served]) -> None:
    """Health, server and model metadata, readiness and the repository index."""

    def get(name: str, version: str | None = None) -> Served:
        return lookup(served, name, version)

    @app.get("/v2/health/live", response_model=schema.Live)
    async def live() -> Response:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready", response_model=schema.Ready, responses=_errors(503))
    async def ready() -> Response:
        ok = all(s.ready for s in served.values())
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    @app.get("/v2", response_model=schema.ServerMetadata)
    async def server_metadata() -> Response:
        return JSONResponse({"name": "quench", "version": __version__, "extensions": EXTENSIONS})

    @app.get("/v2/models/{name}", response_model=schema.ModelMetadata, responses=_errors(404))
    async def model_metadata(name: str) -> Response:
        return JSONResponse(get(name).api.metadata())

    @app.get(
        "/v2/models/{name}/versions/{version}",
        response_model=schema.ModelMetadata,
        responses=_errors(404),
    )
    async def model_version_metadata(name: str, version: str) -> Response:
        return JSONResponse(get(name, version).api.metadata())

    def is_ready(name: str, version: str | None) -> Response:
        s = get(name, version)
        if not s.ready:
            return JSONResponse({"error": f"model {name!r} is not ready"}, 503)
        return JSONResponse({"name": name, "ready": True})

    @app.get(
        "/v2/models/{name}/ready", response_model=schema.ModelReady, responses=_errors(404, 503)
    )
    async def model_ready(name: str) -> Response:
        return is_ready(name, None)

    @app.get(
        "/v2/models/{name}/versions/{version}/ready",
        response_model=schema.ModelReady,
        responses=_errors(404, 503),
    )
    async def model_version_ready(name: str, version: str) -> Response:
        return is_ready(name, version)

    @app.post("/v2/repository/index", response_model=list[schema.IndexEntry])
    async def repository_index() -> Response:
        return JSONResponse(
            [
                {"name": n, "version": VERSION, "state": "READY" if s.ready else "UNAVAILABLE"}
                for n, s in served.items()
            ]
        )


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}
        },
    }
}
INFER_DOC = (
    "KServe v2 inference. Binary tensor data extension: the JSON header (this schema), "
    f"then raw little-endian tensors; the {HEADER_LENGTH} header gives the JSON's length."
)


def _infer_routes(app: FastAPI, served: dict[str, Served], work: Work) -> None:
    """v2 infer, with and without a version."""

    async def infer_route(request: Request, name: str, version: str | None) -> Response:
        # Guard answers these paths itself (InferPath, the same Work); these routes describe
        # them in OpenAPI and answer when the inner app is called without Guard
        s = lookup(served, name, version)
        body = await request.body()
        header_length = request.headers.get(HEADER_LENGTH)
        content, headers = await work.infer(request.scope, s, body, header_length)
        return Response(content, 200, headers=headers)

    infer_api: dict[str, Any] = {
        "response_model": schema.InferenceResponse,
        "responses": ERRORS,
        "openapi_extra": INFER_BODY,
        "description": INFER_DOC,
    }

    @app.post("/v2/models/{name}/infer", **infer_api)
    async def infer(request: Request, name: str) -> Response:
        return await infer_route(request, name, None)

    @app.post("/v2/models/{name}/versions/{version}/infer", **infer_api)
    async def infer_version(request: Request, name: str, version: str) -> Response:
        return await infer_route(request, name, version)


IMAGE = {"type": "string", "format": "binary"}
CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": IMAGE},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": IMAGE},
                    "required": ["file"],
                }
            },
        },
    }
}


def _classify_route(app: FastAPI, served: dict[str, Served], work: Work) -> None:
    """An encoded image (raw body or a multipart file) to the top-k classes."""

    @app.post(
        "/v2/models/{name}/classify",
        response_model=schema.Classification,
        responses=ERRORS,
        openapi_extra=CLASSIFY_BODY,
        description="An encoded image (raw body or multipart 'file') -> the top-k classes.",
    )
    async def classify(request: Request, name: str, topk: int = Query(5, ge=1)) -> Response:
        s = lookup(served, name)
        data = await _image_bytes(request)
        x = await work.decode(request.scope, s.api.decode_image, data, large=True)
        y = await work.run(request.scope, s, x)
        return JSONResponse(s.api.encode_classify(y, topk))


async def _image_bytes(request: Request) -> bytes:
    """The encoded image of a classify request: its multipart file, or the raw body."""
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
    return data


def _metrics_route(app: FastAPI, served: dict[str, Served], metrics: Metrics) -> None:
    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        for n, s in served.items():
            metrics.queue_depth.labels(n).set(s.batcher.depth)
        return Response(metrics.render(), 200, media_type=CONTENT_TYPE_LATEST)


def _openapi(app: FastAPI, served: dict[str, Served]) -> Callable[[], dict[str, Any]]:
    """The app's ``openapi``: FastAPI's description, plus the request schema and the served
    names as enums (made once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(
            title="quench",
            version=__version__,
            description="KServe v2 / Open Inference Protocol (REST) and /classify.",
            routes=app.routes,
        )
        comps = doc.setdefault("components", {}).setdefault("schemas", {})
        req = schema.InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(req.pop("$defs", {}))
        comps["InferenceRequest"] = req
        for path in doc["paths"].values():
            for op in path.values():
                for p in op.get("parameters", []):
                    if p["in"] == "path" and p["name"] == "name":
                        p["schema"] = {"type": "string", "enum": sorted(served)}
                    elif p["in"] == "path" and p["name"] == "version":
                        p["schema"] = {"type": "string", "enum": [VERSION]}
        app.openapi_schema = doc
        return doc

    return openapi
