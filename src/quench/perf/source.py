"""The baseline: the raw ONNX source model on plain ONNX Runtime (``quench perf model.onnx``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from quench.backend.onnxruntime.loader import session
from quench.graph import count_macs, load_model
from quench.hw import default_threads
from quench.perf.results import PERCENTILES, PerfResult
from quench.perf.timing import ROUNDS, Timing, random_batch, sweep


def perf_onnx(
    path: str | Path,
    batches: list[int] | None,
    iterations: int | None = None,
    duration: float | None = None,
    warmup: int = 20,
    threads: int | None = None,
    progress: bool = True,
    requests: int = 1,
    rounds: int = ROUNDS,
    percentiles: tuple[float, ...] = PERCENTILES,
    startup_times: dict[str, Any] | None = None,
) -> list[PerfResult]:
    """Baseline: the raw ONNX file on plain ONNX Runtime (default session options); with
    ``requests`` > 1, that many ``run`` calls at once from as many threads. ``startup_times``
    gets the load, compile (session) and first-inference times in ms; ``batches`` None: the
    batch the input declares, or 1, 4 and 8 when it is symbolic."""
    t0 = time.perf_counter()
    src = load_model(path)
    t1 = time.perf_counter()
    # plain: a batch the model does not take fails, as it does in ONNX Runtime (errors
    # logged only: an IR-3 model would warn once per weight listed among its inputs)
    sess = session(str(path), threads=threads, log_severity=3, any_batch=False)
    t2 = time.perf_counter()
    inp = sess.get_inputs()[0]
    if batches is None:
        batches = [inp.shape[0]] if isinstance(inp.shape[0], int) else [1, 4, 8]
    shape = tuple(int(d) if isinstance(d, int) else 0 for d in inp.shape[1:])
    sess.run(None, {inp.name: random_batch(shape, batches[0])})
    if startup_times is not None:
        startup_times["load_ms"] = round((t1 - t0) * 1e3, 3)
        startup_times["compile_ms"] = round((t2 - t1) * 1e3, 3)
        startup_times["first_inference_ms"] = round((time.perf_counter() - t2) * 1e3, 3)
    macs = count_macs(src.model, shape)
    quantized = any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in src.model.graph.node)

    def run(x: np.ndarray) -> Any:
        return sess.run(None, {inp.name: x})

    return sweep(
        [run] * requests if requests > 1 else run,
        shape,
        batches,
        Timing(iterations, duration, warmup, rounds, percentiles),
        progress,
        macs=macs,
        compute="int8" if quantized else "float32",
        threads=threads or default_threads(),
        model=Path(path).stem,
        precision="onnx (source)",
        engine=f"onnxruntime {ort.__version__} (default options)",
    )
