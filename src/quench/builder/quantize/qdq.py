"""The QDQ rewrite: ONNX Runtime's ``quantize_static`` fed Quench's ranges, then the logits
set free; and the helpers that read a QDQ graph.

``quantize_static`` reads the ranges from the calibration cache (no calibration of its own) and
writes per-channel symmetric int8 weights, asymmetric uint8 (or int8) activations and int32
biases; the nodes in ``exclude`` stay float. The QuantizeLinear/DequantizeLinear pair in front of
each graph output is then dropped: the logits stay float.

Normalisations and the transformer's non-linearities stay float (:data:`FLOAT_OPS`):
LayerNormalization is not handed to the quantizer (ONNX Runtime 1.32 quantizes its bias but
leaves its input float, and the MatMul reading it then stays float too; OpenVINO 2026.4 fails
to compile DeiT's graph with it), and the QuantizeLinear/DequantizeLinear pairs in front of
Softmax, LayerNormalization and Erf (GELU) are dropped: their inputs (attention logits, the
residual stream, the GELU argument) have wide ranges an 8-bit grid serves badly, and no int8
kernel computes them anyway.
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

# op types whose inputs stay float: never quantized, their inputs' Q/DQ pairs dropped
FLOAT_OPS = ("LayerNormalization", "InstanceNormalization", "Softmax", "Erf")


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
) -> onnx.ModelProto:
    """The QDQ model of ``model`` with the activation ranges of the calibration cache file
    ``ranges``; ``work`` is a scratch directory."""
    from onnxruntime.quantization import (  # heavy: imported when quantizing
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.registry import QDQRegistry

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
        op_types_to_quantize=sorted(set(QDQRegistry) - set(FLOAT_OPS)),
        calibrate_method=CalibrationMethod.MinMax,
        calibration_cache_path=str(ranges),
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    qdq = onnx.load(str(dst))
    _float_outputs(qdq)
    _float_inputs(qdq, FLOAT_OPS)
    _drop_unread_initializers(qdq)
    return qdq


def _float_inputs(qdq: onnx.ModelProto, ops: Sequence[str]) -> None:
    """Nodes of the types ``ops`` read the float tensor in front of a QuantizeLinear/
    DequantizeLinear pair instead of its fake-quantized copy; pairs left unread are removed."""
    g = qdq.graph
    prod = producers(qdq)
    changed = False
    for node in g.node:
        if node.op_type not in ops:
            continue
        for k, name in enumerate(node.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = prod.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            node.input[k] = q.input[0]
            changed = True
    if not changed:
        return
    outputs = {o.name for o in g.output}
    while True:
        read = {i for n in g.node for i in n.input} | outputs
        dead = [
            n
            for n in g.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and not any(o in read for o in n.output)
        ]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)


def _drop_unread_initializers(qdq: onnx.ModelProto) -> None:
    """Remove initializers no node reads (the scales and zero points of dropped pairs)."""
    g = qdq.graph
    read = {i for n in g.node for i in n.input} | {i.name for i in g.input}
    keep = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(keep)


def _float_outputs(qdq: onnx.ModelProto) -> None:
    """Drop the QuantizeLinear/DequantizeLinear pair in front of each graph output.

    Quantizing the logits to 8 bits helps no kernel but makes near-equal top classes tie exactly
    (and rank by index); their producer (e.g. the classifier Gemm) then outputs float directly.
    """
    g = qdq.graph
    prod = producers(qdq)
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for out in g.output:
        dq = prod.get(out.name)
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
                src.output[k] = out.name
        g.node.remove(dq)
        g.node.remove(q)
        prod = producers(qdq)


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
