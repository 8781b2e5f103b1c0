"""The engine interface. Every engine is a pair:

* ``Engine.compile``: ONNX model + build spec -> payload files and runtime options (build time);
* ``Engine.runner``: payloads + options -> ``Runner`` (activate / infer / deactivate).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from quench.presets import DataConfig

InferFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]  # one batch, by tensor name


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # str = symbolic dimension


@dataclass(frozen=True)
class LayerTime:
    """One layer's time in one run, as the engine's profiler reports it."""

    name: str
    op: str  # the layer's operation (Convolution, QLinearConv, ...)
    precision: str  # what it executed in (f32, bf16, i8/u8, ...; "?" when unknown)
    ms: float
    kernel: str = ""  # the implementation, when the engine names it (brgconv_avx2_I8, ...)


@dataclass
class CompileSpec:
    """What the builder asks of an engine."""

    precision: str
    input_name: str
    output_name: str
    batch: int | None  # None: dynamic batch
    threads: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # --input uint8: fold this preprocessing (channel order, mean/std, layout) into the graph;
    # the compiled model then takes uint8 (N, crop, crop, 3) RGB pixels
    preprocess: DataConfig | None = None
    # force_float16: keep float16 compute even where it is measured slower than float32
    fp16_compute: bool = False
    # bf16 / f16 compute: these layers (ONNX node names) stay in fp32 (the repair's choice)
    float32_layers: tuple[str, ...] = ()

    @property
    def input_dtype(self) -> str:
        """The compiled model's input element type."""
        return "uint8" if self.preprocess is not None else "float32"


@dataclass
class Compiled:
    """An engine's build result: files for the artifact and how to run them."""

    payloads: dict[str, bytes]
    options: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # what actually executes, for the manifest


class Runner(ABC):
    """Runs one compiled model. Use as a context manager or call activate/deactivate."""

    name: str = "runner"

    def __init__(self) -> None:
        self.is_active = False

    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _deactivate(self) -> None: ...

    @abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; inputs and outputs by tensor name."""

    def concurrent(self, n: int, streams: int | None = None) -> list[InferFn]:
        """``n`` infer functions that may run at the same time, one per thread (one request
        each), for throughput with several requests in flight; ``streams``: the engine's
        parallel streams (default ``n``) where it has them."""
        raise NotImplementedError(f"{self.name} cannot run concurrent requests")

    def profile(self, feed: dict[str, np.ndarray], iterations: int) -> list[LayerTime]:
        """Per-layer times of ``iterations`` runs of ``feed`` from the engine's own profiler,
        one entry per layer and run (``quench.profile`` adds them up)."""
        raise NotImplementedError(f"{self.name} has no per-layer profiler")

    @abstractmethod
    def inputs(self) -> list[TensorMeta]: ...

    @abstractmethod
    def outputs(self) -> list[TensorMeta]: ...


class Engine(ABC):
    name: str

    @staticmethod
    @abstractmethod
    def version() -> str: ...

    @abstractmethod
    def supports(self, precision: str) -> bool: ...

    def refusal(self, precision: str) -> str | None:
        """Why ``precision`` does not run on this engine here, in one line (None: it runs)."""
        if self.supports(precision):
            return None
        return f"engine {self.name} cannot run precision {precision} on this CPU"

    def host(self) -> dict[str, Any]:
        """What besides the CPU decides this engine's numerics on this host (its device), for
        the self-check's host key: empty for CPU engines."""
        return {}

    @abstractmethod
    def compile(self, model: onnx.ModelProto, spec: CompileSpec) -> Compiled: ...

    def variants(self, spec: CompileSpec) -> list[dict[str, Any]]:
        """Runtime option sets the builder may time against each other (default: one)."""
        return [{}]

    @abstractmethod
    def runner(
        self, payloads: dict[str, bytes], options: dict[str, Any], threads: int | None = None
    ) -> Runner: ...
