"""Bias correction: take the mean output shift that weight rounding causes off the float bias.

Weight quantization shifts the mean output of each Conv/Gemm by ``op(E[x], W_q - W)``. That
shift (per output channel, from the calibration input means, with the padding taps weighted by
how often they read real input) is subtracted from the float bias (a zero bias is added where
there is none), and the caller quantizes the corrected model again with the same ranges.
(Empirical correction - subtracting the difference of the per-channel output means of the QDQ
and fp32 models - over-corrects when done for all layers at once, since most of a layer's mean
error is inherited from the layers before it; done layer by layer it is no better than this
analytic form and needs one re-quantization per layer.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quench.builder.quantize.qdq import dequantized, producers
from quench.builder.quantize.statistics import Means

_CORRECTED_OPS = ("Conv", "Gemm")


def correctable_nodes(model: onnx.ModelProto, exclude: Sequence[str]) -> list[str]:
    """Conv/Gemm nodes with a constant weight (and bias, if any): bias correction targets."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in _CORRECTED_OPS or node.name in exclude or len(node.input) < 2:
            continue
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if node.input[1] not in inits or (has_bias and node.input[2] not in inits):
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or len(inits[node.input[1]].dims) != 2:
                continue
            if has_bias and len(inits[node.input[2]].dims) > 1:
                continue
        out.append(node.name)
    return out


def corrected_model(
    fp32: onnx.ModelProto, qdq: onnx.ModelProto, nodes: list[str], means: Means
) -> tuple[onnx.ModelProto | None, list[str]]:
    """A copy of ``fp32`` whose ``nodes`` have their biases corrected for the weight rounding
    seen in ``qdq``, and the nodes corrected (``None, []`` when there is nothing to correct)."""
    q_inits = {t.name: t for t in qdq.graph.initializer}
    q_nodes = {n.name: n for n in qdq.graph.node}
    prod = producers(qdq)
    model = onnx.ModelProto.FromString(fp32.SerializeToString())
    by_name = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    shifts: dict[str, np.ndarray] = {}
    for name in nodes:
        node, qnode = by_name[name], q_nodes.get(name)
        stat = means.get(node.input[0])
        if qnode is None or stat is None or len(qnode.input) < 2:
            continue
        dq = prod.get(qnode.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in q_inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        w_hat = dequantized(dq, q_inits)
        if w_hat is None or w_hat.shape != w.shape:
            continue
        mean = np.asarray(stat["mean"], dtype=np.float64)
        try:
            shift = _bias_shift(node, w_hat - w, mean, list(stat["shape"]))
        except ValueError:  # shapes that do not fit the layout assumed above
            continue
        if np.all(np.isfinite(shift)):
            shifts[name] = shift
    if not shifts:
        return None, []
    biases = _bias_tensors(model, list(shifts))
    for name, shift in shifts.items():
        t = biases[name]
        b = numpy_helper.to_array(t).astype(np.float64)
        if b.shape != shift.shape:
            continue
        t.CopyFrom(numpy_helper.from_array((b - shift).astype(np.float32), t.name))
    return model, sorted(shifts)


def _bias_shift(
    node: onnx.NodeProto, dw: np.ndarray, mean: np.ndarray, shape: list[int]
) -> np.ndarray:
    """Expected per-output-channel error ``E[op(x, W + dW) - op(x, W)]`` = ``op(E[x], dW)``.

    ``mean`` is the per-channel mean of the input ``x`` (taken as uniform over space); for a Conv
    each kernel tap is weighted by the fraction of output positions where it reads real input
    rather than padding.
    """
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        w = dw if attrs.get("transB", 0) else dw.T  # [out, in]
        beta = float(attrs.get("beta", 1.0)) or 1.0
        return float(attrs.get("alpha", 1.0)) * (w @ mean) / beta
    group = int(attrs.get("group", 1))
    out_ch, in_per_group = dw.shape[:2]
    spatial = dw.shape[2:]
    weight = np.ones(spatial)
    for axis, k in enumerate(spatial):
        size = shape[1 + axis] if len(shape) > 1 + axis else k
        frac = _tap_fractions(axis, len(spatial), k, size, attrs)
        weight = weight * frac.reshape([-1 if i == axis else 1 for i in range(len(spatial))])
    taps = (dw * weight).reshape(out_ch, in_per_group, -1).sum(axis=2)  # [out, in/group]
    groups_in = mean.reshape(group, in_per_group)
    per_out = np.repeat(groups_in, out_ch // group, axis=0)  # input means seen by each output
    return (taps * per_out).sum(axis=1)


def _tap_fractions(axis: int, nd: int, k: int, size: int, attrs: dict[str, Any]) -> np.ndarray:
    """For each kernel tap along ``axis``: the fraction of outputs reading a non-padding input."""
    stride = list(attrs.get("strides", [1] * nd))[axis]
    dil = list(attrs.get("dilations", [1] * nd))[axis]
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    span = dil * (k - 1) + 1
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = -(-size // stride)
        total = max(0, (out - 1) * stride + span - size)
        small = total // 2
        begin = small if auto == "SAME_UPPER" else total - small
    elif auto == "VALID":
        begin, out = 0, (size - span) // stride + 1
    else:
        begin, end = pads[axis], pads[axis + nd]
        out = (size + begin + end - span) // stride + 1
    if out <= 0:
        return np.ones(k)
    pos = np.arange(out)[:, None] * stride - begin + np.arange(k)[None, :] * dil
    return ((pos >= 0) & (pos < size)).mean(axis=0)


def _bias_tensors(model: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, onnx.TensorProto]:
    """The float bias initializer of each node, created (zeros) where absent; unshared."""
    inits = {t.name: t for t in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    by_name = {n.name: n for n in model.graph.node}
    out: dict[str, onnx.TensorProto] = {}
    for name in nodes:
        node = by_name[name]
        w = inits[node.input[1]]
        channels = w.dims[0]
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            channels = w.dims[0] if attrs.get("transB", 0) else w.dims[1]
        has_bias = len(node.input) > 2 and node.input[2]
        if has_bias and uses.get(node.input[2], 0) == 1 and len(inits[node.input[2]].dims) == 1:
            out[name] = inits[node.input[2]]
            continue
        if has_bias:
            b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            b = np.broadcast_to(b.reshape(-1), (channels,)).copy()
        else:
            b = np.zeros(channels, dtype=np.float32)
        new = numpy_helper.from_array(b, f"{node.input[1]}__quench_bias")
        model.graph.initializer.append(new)
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = new.name
        out[name] = model.graph.initializer[-1]
    return out
