"""Engines that run compiled models. Each lives in ``backend/<engine>/`` (loader + runner)."""

from __future__ import annotations

from importlib import import_module

from quench.backend.base import Compiled, CompileSpec, Engine, Runner, TensorMeta
from quench.errors import QuenchError

__all__ = ["ENGINES", "CompileSpec", "Compiled", "Engine", "Runner", "TensorMeta", "get_engine"]

ENGINES: dict[str, str] = {
    "onnxruntime": "quench.backend.onnxruntime:OnnxRuntimeEngine",
    "openvino": "quench.backend.openvino:OpenVinoEngine",
    "torch-cuda": "quench.backend.torch:TorchCudaEngine",
}


def get_engine(name: str) -> Engine:
    try:
        module, cls = ENGINES[name].split(":")
    except KeyError:
        raise QuenchError(f"unknown engine {name!r}; available: {', '.join(ENGINES)}") from None
    try:
        return getattr(import_module(module), cls)()
    except ImportError as exc:
        raise QuenchError(f"engine {name!r} is not installed ({exc})") from None
