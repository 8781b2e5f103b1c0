"""Build-time steps for OpenVINO: ONNX -> IR (xml + bin), and the CPU precision plan.

What computes is decided from the CPU's capabilities as OpenVINO itself reports them
(``OPTIMIZATION_CAPABILITIES``: FP32 / BF16 / FP16 / INT8), pinned explicitly through
``INFERENCE_PRECISION_HINT`` (without it OpenVINO runs f32 models in bf16 on CPUs with
AVX512_BF16 or AMX), then checked on the compiled model's runtime graph.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import openvino as ov
from openvino.preprocess import PrePostProcessor

from quench.backend.base import Compiled, CompileSpec, Engine, Runner
from quench.backend.openvino import keep_f32
from quench.backend.openvino.runner import (
    BIN,
    CONFIG_KEYS,
    DEVICE,
    STREAMS,
    XML,
    OpenVinoRunner,
    core,
    runtime_precisions,
)
from quench.errors import ModelError, QuenchError
from quench.graph import real_inputs
from quench.hw import cpu_info, default_threads, half_precision_capped
from quench.precision import Precision
from quench.presets import DataConfig

_NAMES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


def cpu_capabilities() -> frozenset[str]:
    """The CPU's ``OPTIMIZATION_CAPABILITIES`` per OpenVINO, or a guess from the ISA flags;
    without the half precisions that ``$ONEDNN_MAX_CPU_ISA`` puts out of its kernels' reach
    (OpenVINO still lists them, and then returns empty outputs or crashes)."""
    try:
        listed = core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")
        return frozenset(str(c) for c in listed) - half_precision_capped()
    except Exception:  # older/odd plugin builds: fall back to /proc/cpuinfo
        flags = set(cpu_info()["flags"])  # type: ignore[arg-type]
        caps = {"FP32", "INT8"}
        if flags & {"avx512_bf16", "amx_bf16"}:
            caps.add("BF16")
        if flags & {"avx512_fp16", "amx_fp16"}:
            caps.add("FP16")
        return frozenset(caps) - half_precision_capped()


def device_name() -> str:
    try:
        return str(core().get_property(DEVICE, "FULL_DEVICE_NAME"))
    except Exception:
        return str(cpu_info()["model"])


@dataclass(frozen=True)
class Plan:
    """How one precision runs on this CPU."""

    hint: str  # INFERENCE_PRECISION_HINT: f32 / bf16 / f16
    stored: str
    computes: str
    compress_to_fp16: bool = False
    int8: bool = False


NO_FP16 = (
    "float32 (this CPU has no float16 arithmetic; bfloat16 would be less accurate than float16)"
)


def _float_compute(caps: frozenset[str], insist: bool) -> tuple[str, str]:
    """What ``force_float16`` computes in: f16 where the CPU has it (then measured against f32
    at build time unless ``insist``: quench.backend.openvino.half), else f32, the fastest
    precision at least as accurate as float16."""
    if "FP16" in caps:
        return "f16", "float16"
    if insist:
        raise QuenchError(
            "--fp16-compute: this CPU has no float16 arithmetic (OpenVINO lists "
            f"{', '.join(sorted(caps)) or 'nothing'})"
        )
    return "f32", NO_FP16


def plan(precision: str, caps: frozenset[str], fp16_compute: bool = False) -> Plan:
    """The precision plan for ``precision`` given the CPU capabilities ``caps``
    (``fp16_compute``: force_float16 must compute in float16)."""
    try:
        p = Precision.parse(precision)
    except QuenchError:
        raise QuenchError(f"engine openvino cannot build precision {precision}") from None
    if p.is_int8:
        if not p.needs <= caps:
            raise QuenchError("this CPU has no int8 support in OpenVINO; use a float precision")
        if p.float_type == "float16":
            # The float layers run in fp32, which holds every fp16 value exactly, on every
            # CPU. Measured: OpenVINO 2026.4's f16 inference precision beside int8 layers, on a
            # CPU with AVX512-FP16 (Sapphire Rapids), gave efficientnet-lite0 top-1 0.016 (fp32:
            # 0.884); bf16 was 3% faster on ResNet-50 but lost 0.5 points more top-1 on
            # efficientnet-lite0 (README, "Precision modes"). fp32 also keeps the artifact's
            # numerics the same on CPUs with and without half-precision arithmetic.
            hint, rest = "f32", "float32 (holds every float16 value exactly)"
        else:
            hint, rest = "f32", "float32"
        return Plan(
            hint,
            "int8 weights (QDQ), float32 elsewhere",
            f"int8 (quantized Conv/Gemm), {rest} elsewhere",
            int8=True,
        )
    if p.float_type == "float32":
        return Plan("f32", "float32", "float32")
    if p.float_type == "float16":
        hint, computes = _float_compute(caps, fp16_compute)
        return Plan(hint, "float16 weights", computes, compress_to_fp16=True)
    if not p.needs <= caps:  # bfloat16
        raise QuenchError(
            "this CPU has no bfloat16 support (OpenVINO lists "
            f"{', '.join(sorted(caps)) or 'nothing'}); use force_float32 or force_float16"
        )
    return Plan("bf16", f"{p.stored} weights", "bfloat16")


def _config(p: Plan, spec: CompileSpec) -> dict[str, str]:
    config = {"INFERENCE_PRECISION_HINT": p.hint, "PERFORMANCE_HINT": "LATENCY"}
    if spec.threads:
        config["INFERENCE_NUM_THREADS"] = str(spec.threads)
    for key, value in spec.options.items():
        k = key.upper()
        if k == "INFERENCE_PRECISION_HINT":
            raise QuenchError("the inference precision follows --precision; do not set it")
        if k not in CONFIG_KEYS:
            raise QuenchError(
                f"unknown OpenVINO option {key!r}; "
                f"use one of {', '.join(sorted(CONFIG_KEYS - {'INFERENCE_PRECISION_HINT'}))}"
            )
        config[k] = str(value).upper() if k == "PERFORMANCE_HINT" else str(value)
    return config


PREPROCESS_INFO = "uint8 NHWC RGB pixels in: OpenVINO PrePostProcessor steps in the graph"


def fold(om: ov.Model, input_name: str, data: DataConfig) -> ov.Model:
    """``om`` with input ``input_name`` taking uint8 (N, crop, crop, 3) RGB pixels: the
    PrePostProcessor converts them to f32, reverses the channels for a BGR model, subtracts the
    mean, divides by the std and changes the layout to the model's."""
    ppp = PrePostProcessor(om)
    step = ppp.input(input_name)
    step.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    step.model().set_layout(ov.Layout(data.layout))
    pre = step.preprocess().convert_element_type(ov.Type.f32)
    if data.channel_order == "BGR":
        pre.reverse_channels()
    mean, std = data.channel_mean_std()
    pre.mean([float(v) for v in mean]).scale([float(v) for v in std])
    return ppp.build()


def convert(
    model: onnx.ModelProto,
    batch: int | None,
    compress_to_fp16: bool,
    preprocess: DataConfig | None = None,
    input_name: str | None = None,
) -> tuple[bytes, bytes]:
    """ONNX model -> OpenVINO IR (xml, bin), batch dimension fixed or dynamic, names kept;
    with ``preprocess``, input ``input_name`` takes uint8 pixels (:func:`fold`)."""
    with tempfile.TemporaryDirectory(prefix="quench-ov-") as tmp:
        src = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(src), save_as_external_data=model.ByteSize() > 2**31 - 1)
        try:
            om = ov.convert_model(str(src))
        except Exception as exc:  # OpenVINO raises its own exception types
            raise ModelError(f"OpenVINO cannot convert the model: {exc}".splitlines()[0]) from None
        onnx_inputs = [i.name for i in real_inputs(model)]
        # Keep the ONNX tensor names exactly (one name per port).
        for port, name in zip(om.inputs, onnx_inputs, strict=False):
            if name in port.get_names():
                port.get_tensor().set_names({name})
        for port, out in zip(om.outputs, model.graph.output, strict=False):
            if out.name in port.get_names():
                port.get_tensor().set_names({out.name})
        shapes = {}
        for port in om.inputs:
            shape = port.get_partial_shape()
            if shape.rank.is_static and shape.rank.get_length() > 0:
                shape[0] = ov.Dimension() if batch is None else ov.Dimension(batch)
                shapes[port.get_any_name()] = shape
        if shapes:
            om.reshape(shapes)
        if preprocess is not None:
            if input_name is None:
                raise ValueError("preprocess needs the input's name")
            om = fold(om, input_name, preprocess)
        xml = Path(tmp) / "model.xml"
        ov.save_model(om, str(xml), compress_to_fp16=compress_to_fp16)
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


def _fp16_measured(
    p: Plan, config: dict[str, str], xml: bytes, weights: bytes, model: Any, spec: CompileSpec
) -> tuple[Plan, dict[str, str], dict[str, Any]]:
    """force_float16 on a CPU with fp16 arithmetic: f16 against f32 compute, timed; the plan
    and config that win, and the manifest's record (``fp16_compute``) and build line."""
    from quench.backend.openvino import half

    if spec.preprocess is not None:
        shape: tuple[int, ...] = (spec.preprocess.crop, spec.preprocess.crop, 3)
    else:
        dims = real_inputs(model)[0].type.tensor_type.shape.dim[1:]
        shape = tuple(int(d.dim_value) for d in dims)
    decision = half.measure(xml, weights, config, spec, shape)
    extra = {"fp16_compute": decision.record, "note": decision.line()}
    if decision.keep_fp16:
        return p, config, extra
    computes = f"float32 (float16 compute measured {decision.ratio:.2f}x float32 on this CPU)"
    plan32 = Plan("f32", p.stored, computes, compress_to_fp16=True)
    return plan32, {**config, "INFERENCE_PRECISION_HINT": "f32"}, extra


class OpenVinoEngine(Engine):
    name = "openvino"

    @staticmethod
    def version() -> str:
        return ov.__version__

    def supports(self, precision: str) -> bool:
        """Whether ``precision`` runs on this CPU (bf16 needs BF16, int8 needs INT8 listed)."""
        try:
            plan(precision, cpu_capabilities())
        except QuenchError:
            return False
        return True

    def compile(self, model: onnx.ModelProto, spec: CompileSpec) -> Compiled:
        caps = cpu_capabilities()
        p = plan(spec.precision, caps, spec.fp16_compute)  # refuses what this CPU lacks
        if p.int8 and not any(n.op_type in _QDQ for n in model.graph.node):
            raise ModelError(
                f"{spec.precision} needs a QDQ-quantized model (QuantizeLinear/DequantizeLinear)"
            )
        config = _config(p, spec)
        xml, weights = convert(
            model, spec.batch, p.compress_to_fp16, spec.preprocess, spec.input_name
        )
        extra: dict[str, Any] = {}
        if p.hint == "f16" and not spec.fp16_compute:
            p, config, extra = _fp16_measured(p, config, xml, weights, model, spec)
        if p.computes == NO_FP16:
            extra["note"] = (
                "this CPU has no float16 arithmetic: the artifact stores float16 and computes "
                "float32 (bfloat16 would be less accurate than float16)"
            )
        if spec.float32_layers and p.hint in ("bf16", "f16"):
            xml = keep_f32.mark(xml, keep_f32.outputs_of(model, spec.float32_layers))
            extra["float32_layers"] = list(spec.float32_layers)

        # Compile what the artifact will hold and look at what really executes.
        with OpenVinoRunner(xml, weights, config, threads=spec.threads) as run:
            props = run.properties()
            counts = runtime_precisions(run.compiled)
        ran = counts["runtime_precisions"]
        if p.int8 and not (ran.get("i8") or ran.get("u8")):
            raise QuenchError(f"OpenVINO runs no int8 kernels for this model ({ran})")
        return Compiled(
            payloads={XML: xml, BIN: weights},
            options=config,
            info={
                "stored": p.stored,
                "computes": p.computes,
                "device": device_name(),
                "capabilities": sorted(caps),
                "inference_precision": _NAMES[props["INFERENCE_PRECISION_HINT"]],
                "performance_hint": props["PERFORMANCE_HINT"],
                **({"preprocess": PREPROCESS_INFO} if spec.preprocess is not None else {}),
                **counts,
                **extra,
            },
        )

    def variants(self, spec: CompileSpec) -> list[dict[str, Any]]:
        """Runtime configurations worth timing: one stream, or the batch split over streams."""
        cores = spec.threads or default_threads()
        if spec.batch is None and cores > 1:
            return [{}, {STREAMS: cores}]
        return [{}]

    def runner(
        self, payloads: dict[str, bytes], options: dict[str, Any], threads: int | None = None
    ) -> Runner:
        return OpenVinoRunner(payloads[XML], payloads[BIN], options, threads=threads)
