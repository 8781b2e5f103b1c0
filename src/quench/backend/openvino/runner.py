"""OpenVINO runner (CPU device): IR read from memory, compiled with the artifact's config."""

from __future__ import annotations

from collections import Counter
from functools import cache
from typing import Any

import numpy as np
import openvino as ov

from quench.backend.base import InferFn, LayerTime, Runner, TensorMeta
from quench.backend.failures import engine_errors
from quench.errors import QuenchError

DEVICE = "CPU"
STREAMS = "streams"
XML, BIN = "model.xml", "model.bin"

# Properties an artifact (or a build's spec.options) may set, as OpenVINO's string names.
CONFIG_KEYS = frozenset(
    {
        "INFERENCE_PRECISION_HINT",
        "PERFORMANCE_HINT",
        "PERFORMANCE_HINT_NUM_REQUESTS",
        "EXECUTION_MODE_HINT",
        "NUM_STREAMS",
        "INFERENCE_NUM_THREADS",
        "ENABLE_CPU_PINNING",
        "ENABLE_HYPER_THREADING",
        "SCHEDULING_CORE_TYPE",
        "CPU_DENORMALS_OPTIMIZATION",
        "PERF_COUNT",
    }
)
# Runtime-model layers that do no arithmetic of their own.
_PASSIVE = frozenset({"Const", "Input", "Output", "Parameter", "Result"})
_HEAVY = frozenset({"Convolution", "Deconvolution", "FullyConnected", "MatMul", "GroupConvolution"})


@cache
def core() -> ov.Core:
    """One OpenVINO core per process (creating one loads the device plugins)."""
    return ov.Core()


def read_ir(xml: bytes, weights: bytes) -> ov.Model:
    """An ``ov.Model`` from IR bytes, without temporary files."""
    buf = np.frombuffer(weights, np.uint8) if weights else np.zeros(0, np.uint8)
    return core().read_model(model=xml, weights=ov.Tensor(buf))


def precision_hint(compiled: ov.CompiledModel) -> str:
    """The inference precision the compiled model really uses: ``f32``, ``bf16`` or ``f16``."""
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


def _node_precision(rt: Any) -> str:
    """What a runtime-model node computes in: its kernel's type, refined by runtimePrecision.

    ``runtimePrecision`` alone can mislead (a Convolution whose weights are stored f16 reports
    f16 while its kernel is ``brgconv_avx512_f32``), so the kernel name's suffix wins when it is
    a type; int8 kernels (``..._I8``) are reported as u8/i8 from ``runtimePrecision``.
    """
    runtime = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "?"
    kernel = rt["primitiveType"].astype(str).rsplit("_", 1)[-1].lower()
    if kernel == "i8":
        return runtime if runtime in ("u8", "i8") else "i8"
    if kernel in ("f32", "bf16", "f16"):
        return kernel
    return runtime


def _kernel_precision(exec_type: str) -> str:
    """The precision in a kernel name's suffix (``brgconv_avx2_I8`` -> i8), else ``?``."""
    suffix = exec_type.rsplit("_", 1)[-1].lower()
    return suffix if suffix in ("f32", "bf16", "f16", "i8", "u8", "i32", "i64") else "?"


def runtime_precisions(compiled: ov.CompiledModel) -> dict[str, Any]:
    """Count the executing nodes of the compiled model by the precision they compute in."""
    overall: Counter[str] = Counter()
    heavy: dict[str, Counter[str]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        layer = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
        if layer in _PASSIVE:
            continue
        prec = _node_precision(rt)
        overall[prec] += 1
        if layer in _HEAVY:
            heavy.setdefault(layer, Counter())[prec] += 1
    return {
        "runtime_precisions": dict(sorted(overall.items())),
        "heavy_layers": {k: dict(sorted(v.items())) for k, v in sorted(heavy.items())},
    }


def _shape(port: Any) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for i, d in enumerate(port.get_partial_shape()):
        dims.append(d.get_length() if d.is_static else ("N" if i == 0 else "?"))
    return tuple(dims)


def _meta(port: Any) -> TensorMeta:
    return TensorMeta(port.get_any_name(), port.get_element_type().to_dtype().name, _shape(port))


class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(
        self, xml: bytes, weights: bytes, config: dict[str, Any], threads: int | None = None
    ) -> None:
        super().__init__()
        config = dict(config)
        # Quench's own option: batches of at least ``streams`` images are split over that many
        # OpenVINO streams (one core each, run concurrently); smaller batches use the latency
        # configuration. Both share nothing but the IR.
        self.streams = int(config.pop(STREAMS, 1))
        unknown = set(config) - CONFIG_KEYS
        if unknown:
            raise QuenchError(f"unknown OpenVINO option(s): {', '.join(sorted(unknown))}")
        self._xml, self._weights = xml, weights
        self.config = {k: str(v) for k, v in config.items()}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = str(threads)
        self.threads = threads
        self._compiled: ov.CompiledModel | None = None
        self._request: ov.InferRequest | None = None
        self._stream_model: ov.CompiledModel | None = None
        self._stream_requests: list[ov.InferRequest] = []
        self._single: ov.InferRequest | None = None
        self._out_names: list[str] = []
        self._concurrent: tuple[int, ov.CompiledModel] | None = None

    def _activate(self) -> None:
        with engine_errors("OpenVINO cannot compile the model"):
            self._compile()

    def _compile(self) -> None:
        compiled = core().compile_model(read_ir(self._xml, self._weights), DEVICE, self.config)
        wanted = self.config.get("INFERENCE_PRECISION_HINT")
        if wanted and precision_hint(compiled) != wanted:
            raise QuenchError(
                f"this model was built to compute in {wanted} but OpenVINO runs it in "
                f"{precision_hint(compiled)} on this CPU; rebuild it here"
            )
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._out_names = [p.get_any_name() for p in compiled.outputs]
        self._single = self._single_image_request()
        if self.streams > 1:
            config = {
                **self.config,
                "PERFORMANCE_HINT": "THROUGHPUT",
                "NUM_STREAMS": str(self.streams),
            }
            model = read_ir(self._xml, self._weights)
            self._stream_model = core().compile_model(model, DEVICE, config)
            self._stream_requests = [
                self._stream_model.create_infer_request() for _ in range(self.streams)
            ]

    def _single_image_request(self) -> ov.InferRequest | None:
        """For a model of mutable batch: a request on a copy compiled for batch 1.

        OpenVINO's CPU kernels on a dynamic batch dimension re-infer shapes and re-plan memory
        at every call; on small models at batch 1 that is 10-20% of the CPU time (MobileNetV3-L:
        7.4 against 6.0 ms an image, RegNetY-400MF 11.5 against 10.4, DeiT-S within the
        noise), which a fixed-shape compile, as ``benchmark_app -shape`` does, does not pay.
        None when the batch is fixed already or another dimension is dynamic."""
        model = read_ir(self._xml, self._weights)
        shapes = {}
        for port in model.inputs:
            shape = port.get_partial_shape()
            if shape.rank.is_dynamic or shape.rank.get_length() == 0 or shape[0].is_static:
                return None
            if any(d.is_dynamic for d in list(shape)[1:]):
                return None
            shapes[port.get_any_name()] = [1, *(d.get_length() for d in list(shape)[1:])]
        model.reshape(shapes)
        return core().compile_model(model, DEVICE, self.config).create_infer_request()

    def _deactivate(self) -> None:
        self._single = None
        self._request = None
        self._compiled = None
        self._stream_requests = []
        self._stream_model = None
        self._concurrent = None

    @property
    def compiled(self) -> ov.CompiledModel:
        if self._compiled is None:
            raise RuntimeError("runner is not active: call activate() first")
        return self._compiled

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._request is None:
            raise RuntimeError("runner is not active: call activate() first")
        batch = len(next(iter(feed.values())))
        with engine_errors():
            if self._stream_requests and batch >= self.streams:
                return self._infer_streams(feed)
            req = self._single if batch == 1 and self._single is not None else self._request
            req.infer(feed, share_inputs=True)  # no input copy: the caller keeps x
        return self._outputs(req)

    def _outputs(self, req: ov.InferRequest) -> dict[str, np.ndarray]:
        """A request reuses its output buffers: copy them out, by name."""
        return {
            name: np.array(req.get_output_tensor(i).data, copy=True)
            for i, name in enumerate(self._out_names)
        }

    def _infer_streams(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Split the batch over the streams, run them concurrently, join in order."""
        parts = {k: np.array_split(v, self.streams) for k, v in feed.items()}
        for i, req in enumerate(self._stream_requests):
            req.start_async(
                {k: np.ascontiguousarray(v[i]) for k, v in parts.items()}, share_inputs=True
            )
        for req in self._stream_requests:
            req.wait()
        parts_out = [self._outputs(r) for r in self._stream_requests]
        return {name: np.concatenate([o[name] for o in parts_out]) for name in self._out_names}

    def concurrent(self, n: int, streams: int | None = None) -> list[InferFn]:
        """``n`` requests on a throughput configuration with ``streams`` streams (default
        ``n``; same precision)."""
        self.compiled  # noqa: B018 - fails when not active
        streams = streams or n
        if n == 1 and streams == 1:
            return [self.infer]
        if self._stream_model is not None and streams == self.streams:
            model = self._stream_model  # the same throughput configuration, already compiled
        else:
            if self._concurrent is None or self._concurrent[0] != streams:
                config = {
                    **self.config,
                    "PERFORMANCE_HINT": "THROUGHPUT",
                    "NUM_STREAMS": str(streams),
                }
                model = core().compile_model(read_ir(self._xml, self._weights), DEVICE, config)
                self._concurrent = (streams, model)
            model = self._concurrent[1]

        def make(req: ov.InferRequest) -> InferFn:
            def infer(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                with engine_errors():
                    req.infer(feed, share_inputs=True)
                return self._outputs(req)

            return infer

        return [make(model.create_infer_request()) for _ in range(n)]

    def profile(self, feed: dict[str, np.ndarray], iterations: int) -> list[LayerTime]:
        """OpenVINO's performance counters (``PERF_COUNT``) on a separately compiled copy of
        the model (the counters slow every run down), ``iterations`` runs after one warm-up."""
        config = {**self.config, "PERF_COUNT": "YES"}
        model = core().compile_model(read_ir(self._xml, self._weights), DEVICE, config)
        req = model.create_infer_request()
        req.infer(feed, share_inputs=True)
        out: list[LayerTime] = []
        for _ in range(iterations):
            req.infer(feed, share_inputs=True)
            for p in req.get_profiling_info():
                if str(p.status).endswith("EXECUTED") and not str(p.status).endswith("NOT_RUN"):
                    out.append(
                        LayerTime(
                            p.node_name,
                            p.node_type,
                            _kernel_precision(p.exec_type),
                            p.real_time.total_seconds() * 1e3,
                            p.exec_type,
                        )
                    )
        return out

    def inputs(self) -> list[TensorMeta]:
        return [_meta(p) for p in self.compiled.inputs]

    def outputs(self) -> list[TensorMeta]:
        return [_meta(p) for p in self.compiled.outputs]

    def properties(self) -> dict[str, str]:
        """What the compiled model runs with (precision, hint, streams, threads)."""
        props = {}
        for key in ("PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS"):
            value = self.compiled.get_property(key)
            props[key] = str(getattr(value, "name", value))  # enums -> "LATENCY"
        props["INFERENCE_PRECISION_HINT"] = precision_hint(self.compiled)
        return props
