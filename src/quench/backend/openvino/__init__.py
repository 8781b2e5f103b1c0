"""OpenVINO (CPU device): IR built from the ONNX model, run with an explicit precision hint."""

from quench.backend.openvino.loader import OpenVinoEngine
from quench.backend.openvino.runner import OpenVinoRunner

__all__ = ["OpenVinoEngine", "OpenVinoRunner"]
