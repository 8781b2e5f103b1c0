"""The KServe v2 / Open Inference Protocol over gRPC, beside the HTTP app, on its models.

The listener shares everything but the wire with HTTP: the app's models (``ClassifierAPI``), their
``Batcher``, the decode pool, ``ServeConfig``'s limits, the metrics and the access log.

Protocol definitions: the generated ``tritonclient.grpc.service_pb2`` modules. Triton's
``inference.GRPCInferenceService`` is the KServe v2 ``grpc_predict_v2.proto`` service (same
package, service, messages and field numbers) plus Triton's extensions (``RepositoryIndex``
among them, and ``ModelConfig``), so KServe clients, ``tritonclient.grpc`` and ``perf_analyzer``
all speak it. Triton
releases those modules with its client, in step with the protocol; vendoring the ``.proto`` and
generating at build time would add grpcio-tools to the build to make the same files.

Requests arrive as bytes and are parsed here, so a message that is not protobuf gets
INVALID_ARGUMENT with one line (grpcio's own deserializer would answer INTERNAL). Limits: a
message over ``max_body_mb`` is refused by gRPC (RESOURCE_EXHAUSTED), at most
``max_connections`` RPCs run at once (beyond: RESOURCE_EXHAUSTED), each is answered within
``timeout_s`` (DEADLINE_EXCEEDED) or the client's own deadline if sooner, and a connection idle
for ``keep_alive_s`` is closed (clients reconnect on their next call). Methods not listed
(shared memory, model control, streaming) are UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import math
import sys
import traceback
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from quench import __version__
from quench.serve.api import VERSION
from quench.serve.app import EXTENSIONS, Served, lookup
from quench.serve.deadline import within
from quench.serve.errors import CannotListen, ServeError

SERVICE = "inference.GRPCInferenceService"
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}  # typed contents per datatype

Handler = Callable[[Any, dict[str, Any]], Awaitable[Message]]


def bad(message: str) -> ServeError:
    return ServeError(400, message)


class InferenceService:
    """The v2 RPCs on an app's state (``create_app(...).state``)."""

    def __init__(self, state: Any, log: bool) -> None:
        self.served: dict[str, Served] = state.served
        self.config = state.config
        self.metrics = state.metrics
        self.decoder = state.decoder
        self.log = log

    def handler(self) -> grpc.GenericRpcHandler:
        rpcs: dict[str, tuple[type[Message], type[Message], Handler]] = {
            "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse, self.live),
            "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse, self.ready),
            "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse, self.server),
            "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse, self.metadata),
            "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse, self.model_config),
            "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse, self.index),
            "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse, self.infer),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    self._answer(name, req, fn), response_serializer=resp.SerializeToString
                )
                for name, (req, resp, fn) in rpcs.items()
            },
        )

    def _answer(
        self, name: str, kind: type[Message], fn: Handler
    ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
        """``fn`` behind parsing, the deadline, the error codes, metrics and the access log."""
        path = f"/{SERVICE}/{name}"

        async def call(data: bytes, context: grpc.aio.ServicerContext) -> Message:
            t0 = perf_counter()
            info: dict[str, Any] = {"path": path, "model": None, "batch": None}
            code, message = grpc.StatusCode.OK, ""
            try:
                try:
                    request = kind.FromString(data)
                except DecodeError as exc:
                    raise bad(f"not a valid {kind.DESCRIPTOR.full_name} message: {exc}") from None
                return await within(self.config.timeout_s, fn(request, info))
            except ServeError as exc:
                code, message = CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message
            except asyncio.TimeoutError:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                message = f"{name}: no answer within {self.config.timeout_s:g} s"
            except asyncio.CancelledError:  # the client went away or its deadline passed
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # a bug, not a bad request: traceback to the log
                traceback.print_exc(file=sys.stderr)
                code = grpc.StatusCode.INTERNAL
                message = " ".join(f"internal error: {type(exc).__name__}: {exc}".split())[:500]
            finally:
                elapsed = perf_counter() - t0
                log = info if self.log else None
                self.metrics.answered(path, "GRPC", code.name, elapsed, log)
            await context.abort(code, message)
            raise AssertionError("unreachable: abort raises")

        return call

    # -- health / metadata ------------------------------------------------------------------
    async def live(self, req: pb.ServerLiveRequest, info: dict) -> Message:
        return pb.ServerLiveResponse(live=True)

    async def ready(self, req: pb.ServerReadyRequest, info: dict) -> Message:
        return pb.ServerReadyResponse(ready=all(s.ready for s in self.served.values()))

    async def model_ready(self, req: pb.ModelReadyRequest, info: dict) -> Message:
        return pb.ModelReadyResponse(ready=lookup(self.served, req.name, req.version).ready)

    async def server(self, req: pb.ServerMetadataRequest, info: dict) -> Message:
        return pb.ServerMetadataResponse(name="quench", version=__version__, extensions=EXTENSIONS)

    async def metadata(self, req: pb.ModelMetadataRequest, info: dict) -> Message:
        meta = lookup(self.served, req.name, req.version).api.metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def model_config(self, req: pb.ModelConfigRequest, info: dict) -> Message:
        """Triton's model configuration (what perf_analyzer reads): tensors without the batch
        dimension, the batcher's largest batch and delay."""
        s = lookup(self.served, req.name, req.version)
        meta = s.api.metadata()

        def tensors(kind: Any, entries: list[dict]) -> list[Any]:
            return [
                kind(name=t["name"], data_type=f"TYPE_{t['datatype']}", dims=t["shape"][1:])
                for t in entries
            ]

        delay_us = int(s.batcher.max_delay_s * 1_000_000)
        return pb.ModelConfigResponse(
            config=mc.ModelConfig(
                name=meta["name"],
                platform=meta["platform"],
                max_batch_size=s.batcher.max_batch,
                input=tensors(mc.ModelInput, meta["inputs"]),
                output=tensors(mc.ModelOutput, meta["outputs"]),
                dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=delay_us),
            )
        )

    async def index(self, req: pb.RepositoryIndexRequest, info: dict) -> Message:
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=n, version=VERSION, state="READY" if s.ready else "UNAVAILABLE")
                for n, s in self.served.items()
                if s.ready or not req.ready
            ]
        )

    # -- inference --------------------------------------------------------------------------
    async def infer(self, req: pb.ModelInferRequest, info: dict) -> Message:
        s = lookup(self.served, req.model_name, req.model_version)
        info["model"] = s.api.name
        if not s.ready:
            raise ServeError(503, f"model {s.api.name!r} is not ready")
        x = await self._tensor(s, req)
        try:
            y, info["batch"] = await s.batcher.submit(x)
        except ServeError:
            raise
        except Exception as exc:
            raise ServeError(500, f"model {s.api.name!r}: inference failed: {exc}") from None
        y = np.ascontiguousarray(y, dtype="<f4")
        out = pb.ModelInferResponse.InferOutputTensor(
            name=s.api.model.output_name, datatype="FP32", shape=y.shape
        )
        return pb.ModelInferResponse(
            model_name=s.api.name,
            model_version=VERSION,
            id=req.id,
            outputs=[out],
            raw_output_contents=[y.tobytes()],
        )

    async def _tensor(self, s: Served, req: pb.ModelInferRequest) -> np.ndarray:
        """The request's one input tensor: raw little-endian bytes, or typed contents."""
        api = s.api
        if len(req.inputs) != 1:
            raise bad(f"expected exactly one input tensor ({api.model.input_name!r})")
        for o in req.outputs:
            api.check_output(o.name)
        t = req.inputs[0]
        shape = list(t.shape)
        api.check_input(t.name, t.datatype, shape)
        given = [f.name for f, _ in t.contents.ListFields()]
        if req.raw_input_contents:
            if len(req.raw_input_contents) != 1 or given:
                raise bad(
                    f"input {t.name!r}: send one raw_input_contents entry or typed contents, "
                    f"not {len(req.raw_input_contents)} entries and {given or 'no'} contents"
                )
            raw = req.raw_input_contents[0]
            want = math.prod(shape) * api.dtype.itemsize
            if len(raw) != want:
                raise bad(
                    f"input {t.name!r}: raw_input_contents has {len(raw)} bytes, "
                    f"expected {want} for shape {shape}"
                )
            return api.from_raw(shape, raw)
        field = CONTENTS[api.datatype]
        if given != [field]:
            raise bad(
                f"input {t.name!r}: {api.datatype} takes raw_input_contents or contents.{field}, "
                f"got {', '.join(given) or 'neither'}"
            )
        values = getattr(t.contents, field)
        try:
            return await self.decoder.run(
                api.from_values, t.name, shape, values, timeout=self.config.timeout_s, large=True
            )
        except asyncio.TimeoutError:
            raise ServeError(504, "decoding the request: no answer in time") from None


class GrpcListener:
    """A ``grpc.aio`` server for an app on ``host:port``; ``start`` and ``stop`` run on the
    app's event loop. ``stop`` (once, however often called) refuses new RPCs and answers those in
    progress, for at most ``timeout_s + 5`` s; the app awaits it before closing its batchers."""

    def __init__(self, state: Any, host: str, port: int, log: bool) -> None:
        self.state = state
        self.where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.log = log
        self.server: grpc.aio.Server | None = None
        self._stopping: asyncio.Future[None] | None = None

    async def start(self) -> None:
        config = self.state.config
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),  # a busy port is an error, not a shared port
                ("grpc.max_receive_message_length", config.max_body_bytes),
                ("grpc.max_send_message_length", -1),
                # a connection with no RPC for keep_alive_s is closed (GOAWAY), as on HTTP
                ("grpc.max_connection_idle_ms", int(config.keep_alive_s * 1000)),
            ],
            maximum_concurrent_rpcs=config.max_connections,
        )
        server.add_generic_rpc_handlers((InferenceService(self.state, self.log).handler(),))
        try:
            server.add_insecure_port(self.where)
        except RuntimeError as exc:
            raise CannotListen(f"cannot listen for gRPC on {self.where}: {exc}") from None
        await server.start()
        self.server = server
        self.state.before_close.append(self.stop)

    def stop(self) -> asyncio.Future[None]:
        if self._stopping is None:
            grace = self.state.config.timeout_s + 5
            if self.server is None:
                self._stopping = asyncio.get_running_loop().create_future()
                self._stopping.set_result(None)
            else:
                self._stopping = asyncio.ensure_future(self.server.stop(grace))
        return self._stopping
