"""Build-time steps for torch on CUDA: the payload is the ONNX model itself, translated to torch
when the artifact is loaded (:mod:`.translate`); the build checks that it translates."""

from __future__ import annotations

from typing import Any

import onnx
import torch

from quench.backend.base import Compiled, CompileSpec, Engine, Runner
from quench.backend.torch.device import describe, has_cuda
from quench.backend.torch.runner import BUCKETS, TorchRunner
from quench.backend.torch.translate import translate
from quench.errors import QuenchError
from quench.external_data import refuse_external_data
from quench.fuse_preprocess import fold
from quench.precision import Precision

PAYLOAD = "model.onnx"
NAME = "torch-cuda"


def _computes(float_type: str, tf32: bool) -> str:
    if float_type == "float32":
        return "float32 (TF32 tensor cores for Conv/MatMul)" if tf32 else "float32 (TF32 off)"
    return f"{float_type} (weights and activations), float32 outputs"


class TorchCudaEngine(Engine):
    name = NAME

    @staticmethod
    def version() -> str:
        return torch.__version__

    def supports(self, precision: str) -> bool:
        """Float modes where torch sees a CUDA GPU; never INT8 (no INT8 convolution on CUDA)."""
        return self.refusal(precision) is None

    def refusal(self, precision: str) -> str | None:
        """Why ``precision`` does not run here, in one line (None when it does)."""
        try:
            mode = Precision.parse(precision)
        except QuenchError as exc:
            return str(exc)
        if mode.is_int8:
            return f"engine {NAME} has no INT8 kernels (torch has no INT8 convolution on CUDA)"
        if not has_cuda():
            return f"engine {NAME} needs a CUDA GPU; torch {torch.__version__} sees none here"
        return None

    def host(self) -> dict[str, Any]:
        """The GPU and the CUDA / cuDNN builds the numerics come from (empty without CUDA)."""
        info = describe("cuda")
        return {k: info[k] for k in ("gpu", "compute_capability", "cuda", "cudnn") if k in info}

    def compile(self, model: onnx.ModelProto, spec: CompileSpec) -> Compiled:
        why = self.refusal(spec.precision)
        if why is not None:
            raise QuenchError(why)
        if spec.preprocess is not None:  # --input uint8: the preprocessing in the graph
            model = fold(model, spec.input_name, spec.preprocess)
        translate(model, "model")  # refused here, at build time, when a node does not translate
        float_type = Precision.parse(spec.precision).float_type
        tf32 = bool(spec.options.get("tf32", False))
        options = {
            "device": "cuda",
            "float_type": float_type,
            "compile": bool(spec.options.get("compile", True)),
            "tf32": tf32,
        }
        return Compiled(
            payloads={PAYLOAD: model.SerializeToString()},
            options=options,
            info={
                **describe("cuda"),
                "stored": "float32 (ONNX payload, converted when loaded)",
                "computes": _computes(float_type, tf32),
                "layout": "channels-last",
                "graphs": "torch.compile + CUDA graphs per batch bucket "
                + "/".join(map(str, BUCKETS)),
            },
        )

    def runner(
        self, payloads: dict[str, bytes], options: dict[str, Any], threads: int | None = None
    ) -> Runner:
        refuse_external_data(payloads[PAYLOAD], f"payload {PAYLOAD}")
        return TorchRunner(payloads[PAYLOAD], **options)
