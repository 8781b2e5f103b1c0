"""Runs the translated graph with torch, on a CUDA GPU (or, for tests, on the CPU).

On CUDA the weights and activations are channels-last and in the build's float type
(float32, float16 or bfloat16; TF32 tensor cores only when ``tf32`` is set). A batch is padded
up to its bucket (1, 2, 4, ... 256) and, with ``compile``, each bucket gets its own
``torch.compile`` graph with CUDA graphs (``mode="reduce-overhead"``), compiled on first use
and timed; once ``compile_budget_s`` is spent, buckets not yet compiled run eagerly.

``to_device`` / ``compute`` / ``to_host`` are the three parts of :meth:`TorchRunner.infer`, so
that the host-to-device copies and the computation can be timed apart; ``compute`` takes and
returns tensors on the device.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx
import torch

from quench.backend.base import Runner, TensorMeta
from quench.backend.torch.device import has_cuda
from quench.backend.torch.translate import OnnxModule, translate
from quench.errors import EngineError

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FLOAT_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NP = {1: "float32", 2: "uint8", 10: "float16"}


def bucket_of(n: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket that holds ``n`` images (``n`` itself past the largest)."""
    return next((b for b in buckets if b >= n), n)


class TorchRunner(Runner):
    name = "torch-cuda"

    def __init__(
        self,
        model: bytes,
        device: str = "cuda",
        float_type: str = "float32",
        compile: bool = True,
        tf32: bool = False,
        compile_budget_s: float = 300.0,
    ) -> None:
        super().__init__()
        self._model = onnx.ModelProto.FromString(model)
        self.device = device
        self.float_type = float_type
        self.dtype = FLOAT_TYPES[float_type]
        self.use_compile = compile
        self.tf32 = tf32
        self.compile_budget_s = compile_budget_s
        self.compile_seconds: dict[int, float] = {}  # per bucket, the first call's time
        self._module: OnnxModule | None = None
        self._compiled: dict[int, Any] = {}

    def _activate(self) -> None:
        if self.device.startswith("cuda") and not has_cuda():
            raise EngineError(
                f"torch-cuda: no CUDA GPU visible to torch {torch.__version__} on this host"
            )
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
            torch.backends.cudnn.benchmark = True
        self._module = self._prepare()

    def _prepare(self, shapes: dict[str, torch.Tensor] | None = None) -> OnnxModule:
        """The model translated (``shapes``: for one input shape), in the float type, on the
        device, channels-last on CUDA."""
        module = translate(self._model, "payload model.onnx", shapes).train(False)
        module.set_float_type(self.dtype)
        module = module.to(self.device)
        if self.device.startswith("cuda"):
            module = module.to(memory_format=torch.channels_last)
        return module

    def _deactivate(self) -> None:
        self._module = None
        self._compiled.clear()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    @property
    def module(self) -> OnnxModule:
        if self._module is None:
            raise RuntimeError("runner is not active: call activate() first")
        return self._module

    def to_device(self, feed: dict[str, np.ndarray]) -> list[torch.Tensor]:
        """The inputs, in graph order, on the device, padded up to their batch's bucket."""
        out = []
        for name in self.module.input_names:
            x = torch.from_numpy(np.ascontiguousarray(feed[name]))
            n = bucket_of(len(x))
            if n > len(x):  # copies of the last image fill the bucket
                x = torch.cat([x, x[-1:].expand(n - len(x), *x.shape[1:])])
            x = x.to(self.device, non_blocking=True)
            if x.is_floating_point():
                x = x.to(self.dtype)
            if x.dim() == 4 and self.device.startswith("cuda"):
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(x)
        return out

    def compute(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One bucket's outputs on the device (overwritten by the next call when compiled)."""
        n = len(xs[0])
        fn = self._function(xs)
        with torch.inference_mode():
            if n in self._compiled:
                torch.compiler.cudagraph_mark_step_begin()
            if n not in self.compile_seconds and n in self._compiled:
                start = time.perf_counter()
                out = fn(*xs)
                self._sync()
                self.compile_seconds[n] = time.perf_counter() - start
                return out
            return fn(*xs)

    def to_host(self, outs: tuple[torch.Tensor, ...], n: int) -> dict[str, np.ndarray]:
        """The first ``n`` rows of each output, as float32 NumPy arrays."""
        host = {}
        for name, y in zip(self.module.output_names, outs, strict=True):
            y = y[:n].float() if y.is_floating_point() else y[:n]
            host[name] = y.cpu().numpy()
        return host

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(feed.values())))
        try:
            return self.to_host(self.compute(self.to_device(feed)), n)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(f"torch-cuda failed on the model: {first}") from None

    def _function(self, xs: list[torch.Tensor]) -> Any:
        """The compiled module for this bucket (compiled now, if the budget allows), else
        the eager one."""
        n = len(xs[0])
        if n in self._compiled:
            return self._compiled[n]
        spent = sum(self.compile_seconds.values())
        if not self.use_compile or spent >= self.compile_budget_s:
            return self.module
        dynamo = torch._dynamo.config
        dynamo.cache_size_limit = max(dynamo.cache_size_limit, 4 * len(BUCKETS))
        mode = "reduce-overhead" if self.device.startswith("cuda") else "default"
        module = self.module
        if module.runtime_shapes:  # this bucket's shapes as constants: one graph, no breaks
            module = self._prepare(self.module.shape_values(*xs))
            module.share_constants(self.module)
        self._compiled[n] = torch.compile(module, mode=mode, dynamic=False)
        return self._compiled[n]

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _meta(self, values: Any) -> list[TensorMeta]:
        metas = []
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                         for d in t.shape.dim)  # fmt: skip
            metas.append(TensorMeta(v.name, _NP.get(t.elem_type, str(t.elem_type)), dims))
        return metas

    def inputs(self) -> list[TensorMeta]:
        names = set(self.module.input_names)
        return self._meta(i for i in self._model.graph.input if i.name in names)

    def outputs(self) -> list[TensorMeta]:
        return self._meta(self._model.graph.output)
