"""ONNX Runtime (CPU execution provider)."""

from quench.backend.onnxruntime.loader import OnnxRuntimeEngine
from quench.backend.onnxruntime.runner import OnnxRuntimeRunner

__all__ = ["OnnxRuntimeEngine", "OnnxRuntimeRunner"]
