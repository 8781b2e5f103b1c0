"""Build-time steps for ONNX Runtime: offline graph optimisation, saved into the artifact."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from quench.backend.base import Compiled, CompileSpec, Engine, Runner
from quench.backend.onnxruntime.runner import OnnxRuntimeRunner
from quench.backend.onnxruntime.session import session
from quench.errors import ModelError, QuenchError
from quench.external_data import refuse_external_data
from quench.fuse_preprocess import fold
from quench.precision import Precision

PAYLOAD = "model.onnx"
PREPROCESS_INFO = "uint8 NHWC RGB pixels in: Cast, Transpose, Mul, Add in the ONNX graph"


def optimize(model: onnx.ModelProto, level: str = "extended") -> onnx.ModelProto:
    """Apply ONNX Runtime's graph optimisations offline and return the optimised model.

    ``extended`` (constant folding, BN/conv fusion, GELU/attention fusions...) is portable across
    CPUs; the layout-specific ``all`` level is applied again when the artifact is loaded.
    """
    if level not in ("basic", "extended"):
        raise ValueError(f"offline optimisation level must be basic or extended, got {level!r}")
    with tempfile.TemporaryDirectory(prefix="quench-ort-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        try:
            session(model, optimization=level, optimized_path=out)
        except Exception as exc:  # ORT raises its own exception types
            raise ModelError(f"ONNX Runtime cannot load the model: {exc}".splitlines()[0]) from None
        return onnx.load(str(out))


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    @staticmethod
    def version() -> str:
        return ort.__version__

    def supports(self, precision: str) -> bool:
        # No float16/bfloat16 kernels on ONNX Runtime's CPU provider for x86: those precisions
        # are refused here rather than silently computed in float32.
        try:
            return Precision.parse(precision).float_type == "float32"
        except QuenchError:
            return False

    def compile(self, model: onnx.ModelProto, spec: CompileSpec) -> Compiled:
        if spec.preprocess is not None:  # --input uint8: the preprocessing in the graph
            model = fold(model, spec.input_name, spec.preprocess)
        optimized = optimize(model)
        int8 = Precision.parse(spec.precision).is_int8
        return Compiled(
            payloads={PAYLOAD: optimized.SerializeToString()},
            options={"graph_optimization_level": "all"},
            info={
                "provider": "CPUExecutionProvider",
                "stored": "int8 weights (QDQ), float32 elsewhere" if int8 else "float32",
                "computes": "int8 Conv/Gemm (QLinear kernels), float32 elsewhere"
                if int8
                else "float32",
                "optimization": "extended at build, all at load",
                **({"preprocess": PREPROCESS_INFO} if spec.preprocess is not None else {}),
            },
        )

    def runner(
        self, payloads: dict[str, bytes], options: dict[str, Any], threads: int | None = None
    ) -> Runner:
        refuse_external_data(payloads[PAYLOAD], f"payload {PAYLOAD}")
        return OnnxRuntimeRunner(payloads[PAYLOAD], threads=threads, **options)
