"""Build: ONNX classifier -> checked, optimised, precision-converted ``.quench`` artifact."""

from quench.builder.core import PRECISIONS, BuildOptions, build

__all__ = ["PRECISIONS", "BuildOptions", "build"]
