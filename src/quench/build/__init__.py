"""Build: ONNX classifier -> checked, optimised, precision-converted ``.quench`` artifact."""

from quench.build.builder import PRECISIONS, BuildOptions, build

__all__ = ["PRECISIONS", "BuildOptions", "build"]
