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
from onnx import TensorProto, numpy_helper

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
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

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
        # ORT's default (both registries), less the ops kept float
        op_types_to_quantize=sorted({*QDQRegistry, *QLinearOpsRegistry} - set(FLOAT_OPS)),
        calibrate_method=CalibrationMethod.MinMax,
        calibration_cache_path=str(ranges),
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    qdq = onnx.load(str(dst))
    _float_outputs(qdq)
    _float_inputs(qdq, FLOAT_OPS)
    _drop_unread_initializers(qdq)
    return qdq


def float_neighbours(model: onnx.ModelProto) -> list[str]:
    """Nodes kept float around :data:`FLOAT_OPS`: each residual Add that feeds a
    LayerNormalization (the transformer's residual stream, whose outlier channels an 8-bit
    per-tensor grid cannot hold), GELU's Div/Add/Mul around its Erf, and a Concat joining a
    broadcast constant (ViT's class token, an Expand) to the patch tokens.

    Quantized, the Adds and GELU cost DeiT-S 14 dB of output SQNR on ONNX Runtime (24.7 -> 10.5
    dB); the quantized class-token Concat runs on OpenVINO 2026.4 at 11 dB against ONNX
    Runtime's 25 dB for the same QDQ graph (24.3 dB kept float)."""
    prod = producers(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type == "Concat" and any(
            i in prod and prod[i].op_type == "Expand" for i in node.input
        ):
            out.append(node.name)
        elif node.op_type == "LayerNormalization":
            src = prod.get(node.input[0])
            if src is not None and src.op_type == "Add":
                out.append(src.name)
        elif node.op_type == "Erf":
            src = prod.get(node.input[0])
            if src is not None and src.op_type in ("Div", "Mul"):
                out.append(src.name)
            frontier = [node]
            for _ in range(3):  # Add 1, Mul x, Mul 0.5 (in either order)
                nxt = [
                    c
                    for f in frontier
                    for c in consumers.get(f.output[0], [])
                    if c.op_type in ("Add", "Mul")
                ]
                out.extend(c.name for c in nxt)
                frontier = nxt
    return sorted(set(out))


def _float_inputs(qdq: onnx.ModelProto, ops: Sequence[str]) -> None:
    """Nodes of the types ``ops`` read the float tensor in front of a QuantizeLinear/
    DequantizeLinear pair instead of its fake-quantized copy; pairs left unread are removed."""
    g = qdq.graph
    prod = producers(qdq)
    inits = {t.name: t for t in g.initializer}
    changed = False
    for node in g.node:
        if node.op_type not in ops:
            continue
        for k, name in enumerate(node.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = prod.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                changed = True
            elif q is None and (values := dequantized(dq, inits)) is not None:
                # a constant the quantizer stored as int8 because a quantized node shares it
                # (exporters merge equal constants: every zero bias, say): a float copy
                own = f"{dq.input[0]}__float"
                if own not in inits:
                    inits[own] = numpy_helper.from_array(values.astype(np.float32), own)
                    g.initializer.append(inits[own])
                node.input[k] = own
                changed = True
    if changed:
        drop_unread_qdq(g)


def drop_unread_qdq(g: onnx.GraphProto) -> None:
    """Remove the QuantizeLinear/DequantizeLinear nodes nothing reads (to a fixed point)."""
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


def dequantized(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The float values a DequantizeLinear of initializers computes (None: not all constant)."""
    if any(i not in inits for i in dq.input if i):
        return None
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = (
        numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
        if len(dq.input) > 2 and dq.input[2]
        else np.zeros_like(scale)
    )
    if scale.ndim == 0 or scale.size == 1:
        return (q - zp.reshape(())) * scale.reshape(())
    axis = quant_axis(dq) % q.ndim
    shape = [-1 if i == axis else 1 for i in range(q.ndim)]
    return (q - zp.reshape(shape)) * scale.reshape(shape)


def quant_axis(node: onnx.NodeProto) -> int:
    """The ``axis`` attribute of a (De)QuantizeLinear node (1 when absent)."""
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return 1
