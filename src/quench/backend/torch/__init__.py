"""torch on a CUDA GPU: the ONNX graph translated to torch (channels-last, fp32/fp16/bf16,
``torch.compile`` and CUDA graphs per batch bucket)."""

from quench.backend.torch.loader import TorchCudaEngine
from quench.backend.torch.runner import TorchRunner

__all__ = ["TorchCudaEngine", "TorchRunner"]
