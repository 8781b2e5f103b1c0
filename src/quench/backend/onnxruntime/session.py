"""The one place an ONNX Runtime session is made (CPU execution provider)."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort

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
    log_severity: int | None = 3,
    optimized_path: str | Path | None = None,
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on ``model`` (a ModelProto, its bytes or a file path).

    ``threads``/``inter_threads``: intra-/inter-op threads; ``optimization``: ``disable``,
    ``basic``, ``extended`` or ``all``; ``log_severity``: 3 logs errors only; ``optimized_path``:
    where ONNX Runtime saves the optimised graph; ``profile_prefix``: profile every node into
    ``<prefix>_<date>.json``. None leaves ONNX Runtime's default.
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
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
