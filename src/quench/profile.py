"""``quench perf --profile``: per-layer times from the engine's own profiler (OpenVINO's
performance counters, ONNX Runtime's profiling), added up per layer, slowest first."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from quench.backend.base import LayerTime
from quench.errors import QuenchError
from quench.perf import random_batch


@dataclass(frozen=True)
class Layer:
    name: str
    op: str
    precision: str
    kernel: str
    ms: float  # mean per run
    share: float  # of the run's summed layer time

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(times: Iterable[LayerTime], runs: int) -> list[Layer]:
    """Each layer's mean time per run and share of the total, slowest first."""
    total: dict[str, float] = {}
    first: dict[str, LayerTime] = {}
    for t in times:
        total[t.name] = total.get(t.name, 0.0) + t.ms
        first.setdefault(t.name, t)
    whole = sum(total.values()) or 1.0
    layers = [
        Layer(n, first[n].op, first[n].precision, first[n].kernel, ms / runs, ms / whole)
        for n, ms in total.items()
    ]
    return sorted(layers, key=lambda layer: -layer.ms)


def by_op(layers: list[Layer]) -> list[dict[str, Any]]:
    """Time per (op, precision), slowest first: where the time goes at a glance."""
    groups: dict[tuple[str, str], list[Layer]] = {}
    for layer in layers:
        groups.setdefault((layer.op, layer.precision), []).append(layer)
    rows = [
        {
            "op": op,
            "precision": prec,
            "layers": len(ls),
            "ms": round(sum(x.ms for x in ls), 5),
            "share": round(sum(x.share for x in ls), 5),
        }
        for (op, prec), ls in groups.items()
    ]
    return sorted(rows, key=lambda r: -r["ms"])


def profile_model(model: Any, batch: int, runs: int = 20, inputs: Any = None) -> dict[str, Any]:
    """Profile a loaded ``quench.Model`` at ``batch``: every layer, and the time per op."""
    if model.fixed_batch and batch != model.fixed_batch:
        batch = model.fixed_batch
    dtype = model.data.input_dtype  # float32, or uint8 pixels (--input uint8)
    if inputs is None:
        x = random_batch(model.data.input_shape, batch, dtype)
    else:
        x = inputs[np.arange(batch) % len(inputs)]
    feed = {model.input_name: np.ascontiguousarray(x, dtype=dtype)}
    try:
        times = model.runner.profile(feed, runs)
    except NotImplementedError as exc:
        raise QuenchError(str(exc)) from None
    layers = summarize(times, runs)
    return {
        "engine": model.engine,
        "batch": batch,
        "runs": runs,
        "total_ms": round(sum(layer.ms for layer in layers), 5),
        "layers": [layer.to_dict() for layer in layers],
        "by_op": by_op(layers),
    }
