"""INT8 post-training quantization of a graph-optimised ONNX classifier into a QDQ model.

:func:`quantize` runs the stages in order (deterministic: the same model, data and config give
the same bytes), one module each:

1. ``first_layer``: the layer reading the model input stays float, or its Conv is rewritten to
   read whole pixel values (``QuantConfig.input_grid``), which an 8-bit grid holds exactly.
2. ``statistics``: one fp32 pass over the calibration images (min/max, histograms, the input
   means of every Conv/Gemm), then an activation range per tensor by ``QuantConfig.method``.
   Skipped when a cache is given.
3. ``cache``: those measurements as one JSON envelope that ONNX Runtime's ``quantize_static``
   reads as its calibration cache; passing it back as ``cache`` skips the calibration pass.
4. ``qdq``: ``quantize_static`` with those ranges; the logits stay float. The pixel-grid Conv's
   weights are then rounded by GPTQ (``first_layer``).
5. ``bias``: the mean output shift that weight rounding causes is taken off the float biases,
   and the model is quantized again with the same ranges.

``QuantConfig`` (``config``) says how; the builder's choices and the measurements behind them are
in ``bench/README.md``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quench.builder.quantize import bias, first_layer, qdq, statistics
from quench.builder.quantize import cache as envelope
from quench.builder.quantize.cache import Calibration, Source
from quench.builder.quantize.config import (
    ACTIVATION_TYPES,
    METHODS,
    QuantConfig,
    check_config,
    percentile_of,
    weight_max,
)
from quench.builder.quantize.statistics import Progress
from quench.canonical import softmax_nodes
from quench.errors import QuenchError

__all__ = [
    "ACTIVATION_TYPES",
    "METHODS",
    "QuantConfig",
    "QuantResult",
    "Source",
    "quantize",
]


@dataclass
class QuantResult:
    model: onnx.ModelProto  # the QDQ model (fp32 tensors elsewhere)
    ranges: bytes  # the calibration cache envelope (JSON), reusable as ``cache``
    info: dict[str, Any] = field(default_factory=dict)
    # the float graph the QDQ rewrite started from (node names as in ``model``, first layer
    # rewritten, biases not corrected): what ``layers.with_float_layers`` takes weights from
    float_model: onnx.ModelProto | None = None


def quantize(
    model: onnx.ModelProto,
    input_name: str,
    calib: np.ndarray,
    config: QuantConfig,
    cache: bytes | None = None,
    progress: Progress | None = None,
    source: Source | None = None,
) -> QuantResult:
    """Quantize ``model`` (graph-optimised, batch dimension symbolic) to an INT8 QDQ model.

    ``calib`` is the preprocessed calibration tensor ``[N, C, H, W]`` for ``input_name``. With
    ``cache`` (the ``ranges`` of an earlier result for the same model, data and config) no
    inference is run at all (``calib`` may then be empty). ``source``, what the calibration was
    made from, is recorded in the returned cache.
    """
    start = time.perf_counter()
    check_config(config)
    model = _prepare(model, input_name)
    # a softmax head (and the reshapes after it) stays float: 8-bit class scores tie
    tail = [n for o in model.graph.output for n in softmax_nodes(model, o.name)]
    exclude = sorted({*_check_exclude(model, config.exclude), *qdq.float_neighbours(model), *tail})
    grid: str | None = None
    if config.float_first_layer is not True and config.input_grid is not None:
        model, grid, grid_nodes = first_layer.pixel_grid_first_conv(
            model, input_name, *config.input_grid
        )
        exclude = sorted({*exclude, *grid_nodes})
    if config.float_first_layer or (config.float_first_layer is None and grid is None):
        exclude = sorted({*exclude, *first_layer.float_first_layer_nodes(model, input_name)})
    calib = _check_calib(model, input_name, calib, need=cache is None)
    tensors = statistics.activation_tensors(model)
    corrected = bias.correctable_nodes(model, exclude) if config.bias_correction else []
    batch = statistics.batch_size(model, input_name, calib)
    n_batches = -(-len(calib) // batch) if len(calib) else 0
    tick = statistics.Ticker(progress, total=0 if cache is not None else n_batches)
    # input means of every Conv/Gemm (not only the corrected ones): caches stay interchangeable
    nodes = {n.name: n for n in model.graph.node}
    mean_inputs = list(dict.fromkeys(nodes[n].input[0] for n in bias.correctable_nodes(model, ())))

    with qdq.quiet():
        if cache is not None:
            cal = envelope.load(cache, config, model, tensors)
            if any(t not in cal.means for t in mean_inputs):
                raise QuenchError("calibration cache has no input means for bias correction")
            if grid is not None and cal.moments is None:
                raise QuenchError(
                    "calibration cache has no first-layer input moments (made by an older "
                    "Quench?): build without it to calibrate again"
                )
        else:
            stats = statistics.collect(
                model, input_name, calib, tensors, config.method, mean_inputs, batch, tick
            )
            cal = Calibration(statistics.ranges(stats, config), stats.means)
            if grid is not None:
                assert config.input_grid is not None
                cal.moments = first_layer.grid_moments(model, grid, calib, *config.input_grid)
        if grid is None:
            cal.moments = None
        else:
            cal.ranges[grid] = (0.0, 255.0)  # whole pixel values: an 8-bit grid with step 1
        cache_bytes = envelope.dump(cal, config, model, source)
        rounding = (grid, cal.moments) if grid is not None and cal.moments is not None else None

        with tempfile.TemporaryDirectory(prefix="quench-quant-") as tmp:
            work = Path(tmp)
            ranges_file = work / "ranges.json"
            ranges_file.write_bytes(cache_bytes)  # ORT ignores the "quench" key
            qmodel = _to_qdq(model, config, exclude, rounding, ranges_file, work)
            corrected_nodes: list[str] = []
            if corrected:
                fixed, corrected_nodes = bias.corrected_model(model, qmodel, corrected, cal.means)
                if fixed is not None:
                    qmodel = _to_qdq(fixed, config, exclude, rounding, ranges_file, work)

    info = {
        "method": config.method,
        "percentile": percentile_of(config),
        "weight_method": "minmax",  # per-channel scales covering the largest weight
        "activation_type": config.activation_type,
        "per_channel": config.per_channel,
        "weight_bits": config.weight_bits,
        "calibration_images": len(calib) if cache is None else None,
        "cache_reused": cache is not None,
        "quantized_nodes": qdq.quantized_counts(qmodel),
        "float_nodes": sorted(exclude),
        "first_layer_pixel_grid": grid is not None,
        "first_layer_rounding": "gptq" if grid is not None else None,
        "first_layer_output_error": (
            first_layer.first_layer_error(qmodel, model, *rounding, weight_max(config))
            if rounding is not None
            else None
        ),
        "bias_corrected": len(corrected_nodes),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return QuantResult(model=qmodel, ranges=cache_bytes, info=info, float_model=model)


def _to_qdq(
    model: onnx.ModelProto,
    config: QuantConfig,
    exclude: Sequence[str],
    rounding: tuple[str, np.ndarray] | None,
    ranges_file: Path,
    work: Path,
) -> onnx.ModelProto:
    """The QDQ model of ``model``, its pixel-grid Conv (if any) rounded by GPTQ."""
    qmodel = qdq.to_qdq(model, config, exclude, ranges_file, work)
    if rounding is not None:
        first_layer.gptq_first_layer(qmodel, model, *rounding, weight_max(config))
    return qmodel


# --------------------------------------------------------------------------------------------
# the inputs


def _prepare(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """A copy of ``model`` as ORT's quantizer wants it: one input, named and unique nodes."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inputs = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    if input_name not in inputs:
        raise QuenchError(f"model has no input {input_name!r}; inputs: {', '.join(sorted(inputs))}")
    if len(inputs) != 1:
        raise QuenchError(f"quantization needs a single-input model, got {len(inputs)} inputs")
    # IR < 4 lists initializers as graph inputs; ORT's quantizer wants them out.
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.ir_version = max(model.ir_version, 7)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    names = [n.name for n in model.graph.node]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        for i, node in enumerate(model.graph.node):
            if node.name in seen:
                node.name = f"{node.name}__{i}"
            seen.add(node.name)
    return model


def _check_exclude(model: onnx.ModelProto, exclude: Sequence[str]) -> list[str]:
    names = {n.name for n in model.graph.node}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise QuenchError(f"cannot keep unknown node(s) in float: {', '.join(unknown)}")
    return sorted(set(exclude))


def _check_calib(
    model: onnx.ModelProto, input_name: str, calib: np.ndarray, need: bool
) -> np.ndarray:
    calib = np.ascontiguousarray(calib, dtype=np.float32)
    if calib.ndim != 4:
        raise QuenchError(f"calibration data must be [N, C, H, W], got shape {calib.shape}")
    if need and len(calib) == 0:
        raise QuenchError("no calibration images")
    if not np.isfinite(calib).all():
        raise QuenchError("calibration data contains NaN or infinite values")
    inp = next(i for i in model.graph.input if i.name == input_name)
    dims = inp.type.tensor_type.shape.dim
    want = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    pairs = zip(want[1:], calib.shape[1:], strict=False)
    if len(want) == 4 and any(w is not None and w != g for w, g in pairs):
        raise QuenchError(
            f"calibration data shape {calib.shape[1:]} does not match input {input_name!r} "
            f"{tuple(want)}"
        )
    return calib
