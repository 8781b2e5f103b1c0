"""The one place an ONNX Runtime session is made (CPU execution provider)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from quench.backend.failures import engine_errors

ort.disable_telemetry_events()  # ONNX Runtime's platform telemetry (Windows ETW): off

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session(
    model: onnx.ModelProto | bytes | str | Path,
    *,
    threads: int | None = None,
    inter_threads: int | None = None,
    optimization: str | None = None,
    log_severity: int | None = 4,
    optimized_path: str | Path | None = None,
    profile_prefix: str | None = None,
    any_batch: bool = True,
) -> Session:
    """An ONNX Runtime CPU session on ``model`` (a ModelProto, its bytes or a file path).

    ``threads``/``inter_threads``: intra-/inter-op threads; ``optimization``: ``disable``,
    ``basic``, ``extended`` or ``all``; ``log_severity``: 4 logs fatal errors only (a failure
    is raised as one line instead); ``optimized_path``: where ONNX Runtime saves the optimised
    graph; ``profile_prefix``: profile every node into
    ``<prefix>_<date>.json``. None leaves ONNX Runtime's default. ``any_batch``: a model with a
    fixed batch runs other batch sizes in chunks of it (:class:`Session`).
    """
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if inter_threads:
        so.inter_op_num_threads = inter_threads
    if optimization is not None:
        so.graph_optimization_level = LEVELS[optimization]
    if log_severity is not None:
        so.log_severity_level = log_severity
    if profile_prefix is not None:  # per-node times, written to a JSON file by end_profiling
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    with engine_errors("ONNX Runtime cannot load the model"):
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return Session(sess, any_batch)


class Session:
    """An ONNX Runtime session whose ``run`` raises :class:`~quench.errors.EngineError` (one
    line) and takes any batch: a model whose inputs have a fixed batch ``B`` (one that only
    runs at that batch, :mod:`quench.batch_form`) runs a batch of another size in chunks of
    ``B``, the last one filled up with copies of its last image, and the outputs put back
    together (outputs with ``B`` first lose the filler rows)."""

    def __init__(self, sess: ort.InferenceSession, any_batch: bool = True) -> None:
        self._sess = sess
        dims = {i.shape[0] if i.shape else None for i in sess.get_inputs()}
        (dim,) = dims if len(dims) == 1 else (None,)
        fixed = any_batch and isinstance(dim, int) and dim > 0
        self.fixed_batch: int | None = dim if fixed else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sess, name)

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: dict[str, np.ndarray],
        run_options: Any = None,
    ) -> list[np.ndarray]:
        b = self.fixed_batch
        n = len(next(iter(input_feed.values()))) if input_feed else 0
        with engine_errors():
            if b is None or n == b or n == 0:
                return self._sess.run(output_names, input_feed, run_options)
            parts: list[list[np.ndarray]] = []
            for i in range(0, n, b):
                feed = {k: _fill(v[i : i + b], b) for k, v in input_feed.items()}
                parts.append(self._sess.run(output_names, feed, run_options))
        outs = []
        for chunks in zip(*parts, strict=True):
            joined = np.concatenate(chunks)
            outs.append(joined[:n] if all(len(c) == b for c in chunks) else joined)
        return outs


def _fill(x: np.ndarray, b: int) -> np.ndarray:
    """``x`` with copies of its last row appended up to ``b`` rows."""
    if len(x) == b:
        return x
    return np.concatenate([x, np.repeat(x[-1:], b - len(x), axis=0)])
