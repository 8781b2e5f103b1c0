"""The QDQ rewrite: ONNX Runtime's ``quantize_static`` fed Quench's ranges, then the logits
set free; and the helpers that read a QDQ graph.

``quantize_static`` reads the ranges from the calibration cache (no calibration of its own) and
writes per-channel symmetric int8 weights, asymmetric uint8 (or int8) activations and int32
biases; the nodes in ``exclude`` stay float. The QuantizeLinear/DequantizeLinear pair in front of
each graph output is then dropped: the logits stay float.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from quench.builder.quantize.config import QuantConfig


class _OrtQuantNoise(logging.Filter):
    """Drops ONNX Runtime quantization's own warnings (logged on the root logger)."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.WARNING and record.pathname.startswith(self.where))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence ONNX Runtime's quantization warnings for the duration, and nothing else: the
    caller's own logging is untouched (a filter on the root logger and the level of the
    ``onnxruntime.quantization`` loggers, both restored on the way out)."""
    import onnxruntime.quantization as ortq

    noise = _OrtQuantNoise(str(Path(ortq.__file__).parent))
    named = logging.getLogger("onnxruntime.quantization")
    level = named.level
    root = logging.getLogger()
    root.addFilter(noise)
    named.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(noise)
        named.setLevel(level)


def to_qdq(
    model: onnx.ModelProto,
    config: QuantConfig,
    exclude: Sequence[str],
    ranges: Path,
    work: Path,
    float_tensors: Sequence[str] = (),
) -> onnx.ModelProto:
    """The QDQ model of ``model`` with the activation ranges of the calibration cache file
    ``ranges``; ``work`` is a scratch directory; ``float_tensors`` (default: the graph outputs)
    are left in float."""
    from onnxruntime.quantization import (  # heavy: imported when quantizing
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src, dst = work / "fp32.onnx", work / "qdq.onnx"
    onnx.save(model, src)
    quantize_static(
        str(src),
        str(dst),
        None,
        quant_format=QuantFormat.QDQ,
        per_channel=config.per_channel,
        activation_type=QuantType.QUInt8 if config.activation_type == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        reduce_range=config.weight_bits == 7,
        nodes_to_exclude=list(exclude),
        calibrate_method=CalibrationMethod.MinMax,
        calibration_cache_path=str(ranges),
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    qdq = onnx.load(str(dst))
    _float_outputs(qdq, float_tensors or [o.name for o in qdq.graph.output])
    return qdq


def _float_outputs(qdq: onnx.ModelProto, names: Sequence[str]) -> None:
    """Drop the QuantizeLinear/DequantizeLinear pair in front of each tensor of ``names`` (the
    graph outputs, and the logits a softmax head reads).

    Quantizing the logits to 8 bits helps no kernel but makes near-equal top classes tie exactly
    (and rank by index); their producer (e.g. the classifier Gemm) then outputs float directly.
    """
    g = qdq.graph
    prod = producers(qdq)
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    for name in names:
        if name not in outputs:
            _unquantize(qdq, name)
            prod = producers(qdq)
            continue
        dq = prod.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = prod.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or uses.get(dq.input[0], 0) != 1:
            continue
        src = prod.get(q.input[0])
        if src is None or uses.get(q.input[0], 0) != 1:
            continue
        if any(o.name == q.input[0] for o in g.output):
            continue
        for k, o in enumerate(src.output):
            if o == q.input[0]:
                src.output[k] = name
        g.node.remove(dq)
        g.node.remove(q)
        prod = producers(qdq)


def _unquantize(qdq: onnx.ModelProto, name: str) -> None:
    """Let the readers of the tensor ``name`` (not a graph output) read it in float: each
    QuantizeLinear of it, and its DequantizeLinear readers, are dropped."""
    g = qdq.graph
    for q in [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == name]:
        readers = [n for n in g.node if q.output[0] in n.input]
        if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
            continue
        for dq in readers:
            for n in g.node:
                n.input[:] = [name if i == dq.output[0] else i for i in n.input]
            g.node.remove(dq)
        g.node.remove(q)


def quantized_counts(qdq: onnx.ModelProto) -> dict[str, int]:
    """Nodes (by op type) that read quantized data: some input through DequantizeLinear, and no
    float weight (a float initializer input) left unquantized."""
    prod = producers(qdq)
    float_inits = {
        t.name
        for t in qdq.graph.initializer
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
        and int(np.prod(t.dims)) > 1  # scalars (Clip bounds...) are attributes, not weights
    }
    counts: dict[str, int] = {}
    for n in qdq.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        ins = [i for i in n.input if i]
        from_dq = any(i in prod and prod[i].op_type == "DequantizeLinear" for i in ins)
        if from_dq and not any(i in float_inits for i in ins):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The node writing each tensor."""
    return {o: n for n in model.graph.node for o in n.output}


def quant_axis(node: onnx.NodeProto) -> int:
    """The ``axis`` attribute of a (De)QuantizeLinear node (1 when absent)."""
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return 1
