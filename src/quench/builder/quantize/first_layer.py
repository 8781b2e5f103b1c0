"""First-layer transforms: keep the layer reading the model input float, or let it read whole
pixel values (the pixel grid) with its weights rounded by GPTQ.

Quantizing the normalised input ``x = (p - mean) / std`` as it is puts every pixel off the 8-bit
grid: one of the largest single errors in the network. So either the first Conv/Gemm stays float
(:func:`float_first_layer_nodes`), or the first Conv is rewritten to read ``p`` itself
(:func:`pixel_grid_first_conv`), which an 8-bit grid with step 1 holds exactly. That Conv's
weights are then rounded by GPTQ (Frantar et al. 2022, :func:`gptq_first_layer`): column by
column, each rounding error is pushed onto the weights not yet rounded through the inverse of the
second moments of the layer's input patches on the calibration images
(:func:`grid_moments`, kept in the calibration cache), minimising the output error rather than
the weight error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quench.builder.quantize.qdq import producers, quant_axis
from quench.errors import QuenchError

_COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_SHAPE_OPS = ("Shape", "Size")


def float_first_layer_nodes(model: onnx.ModelProto, input_name: str) -> list[str]:
    """The first Conv/Gemm/MatMul nodes fed by the model input, and any nodes on the way.

    Keeping them in float leaves the input unquantized: an 8-bit grid over the input range
    generally misses the (e.g. (pixel - mean) / std) grid of the input values, and the error it
    adds to every pixel is one of the largest in the network. The input's Shape (a batch size
    for a broadcast, as in ViT's class token) carries no pixel: the nodes after it are not
    on the way.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out: list[str] = []
    seen: set[str] = set()
    frontier = [input_name]
    while frontier:
        tensor = frontier.pop()
        for n in consumers.get(tensor, []):
            if n.name in seen or n.op_type in _SHAPE_OPS:
                continue  # a Shape reads the input's dimensions, not its pixels
            seen.add(n.name)
            out.append(n.name)
            if n.op_type not in _COMPUTE_OPS:
                frontier.extend(o for o in n.output if o)
    return out


# --------------------------------------------------------------------------------------------
# the pixel grid


def pixel_grid_first_conv(
    model: onnx.ModelProto,
    input_name: str,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[onnx.ModelProto, str | None, list[str]]:
    """Let the first Conv read whole pixel values, which an 8-bit grid holds exactly.

    The input is ``x = (p - mean) / std`` with ``p`` the integer pixel values; any 8-bit grid over
    ``x`` misses most of them. Rewritten: ``P = Pad(x, 0) * std + mean`` (``p`` again, the padding
    taps becoming ``mean``: what the zero padding of ``x`` meant) and ``Conv(P, W / std, b -
    sum(W / std * mean))`` without padding: the same function, whose input quantizes exactly with
    step 1 over [0, 255] (interior exactly; padding taps round ``mean`` to a whole value).
    Returns the model, the new Conv input (``None`` when the graph does not start with a plain
    Conv on the input) and the helper nodes, which stay float.
    """
    g = model.graph
    users = [n for n in g.node if input_name in n.input]
    inits = {t.name: t for t in g.initializer}
    if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != input_name:
        return model, None, []
    conv = users[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if attrs.get("group", 1) != 1 or auto_pad not in (b"NOTSET", b"VALID", "NOTSET", "VALID"):
        return model, None, []
    if conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] not in inits):
        return model, None, []
    w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
    if w.ndim != 4 or w.shape[1] != len(mean) or len(std) != len(mean):
        return model, None, []
    b = (
        numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
        if len(conv.input) > 2 and conv.input[2]
        else np.zeros(w.shape[0])
    )
    m = np.asarray(mean, np.float64)[None, :, None, None]
    s = np.asarray(std, np.float64)[None, :, None, None]
    w2 = w / s
    b2 = b - (w2 * m).sum(axis=(1, 2, 3))
    pads = list(attrs.get("pads", [0, 0, 0, 0])) if auto_pad in (b"NOTSET", "NOTSET") else []
    pads = pads or [0, 0, 0, 0]

    pre = "quench_pixel_grid"
    nodes: list[onnx.NodeProto] = []
    src = input_name
    if any(pads):
        top, left, bottom, right = pads
        g.initializer.append(
            numpy_helper.from_array(
                np.array([0, 0, top, left, 0, 0, bottom, right], np.int64), f"{pre}_pads"
            )
        )
        nodes.append(helper.make_node("Pad", [src, f"{pre}_pads"], [f"{pre}_padded"], f"{pre}_pad"))
        src = f"{pre}_padded"
    g.initializer.extend(
        [
            numpy_helper.from_array(s.astype(np.float32), f"{pre}_std"),
            numpy_helper.from_array(m.astype(np.float32), f"{pre}_mean"),
            numpy_helper.from_array(w2.astype(np.float32), f"{pre}_W"),
            numpy_helper.from_array(b2.astype(np.float32), f"{pre}_B"),
        ]
    )
    nodes.append(helper.make_node("Mul", [src, f"{pre}_std"], [f"{pre}_scaled"], f"{pre}_mul"))
    nodes.append(helper.make_node("Add", [f"{pre}_scaled", f"{pre}_mean"], [pre], f"{pre}_add"))
    w_name, b_name = conv.input[1], conv.input[2] if len(conv.input) > 2 else ""
    del conv.input[:]
    conv.input.extend([pre, f"{pre}_W", f"{pre}_B"])
    for a in conv.attribute:
        if a.name == "pads":
            a.CopyFrom(helper.make_attribute("pads", [0, 0, 0, 0]))
    used = {i for n in g.node for i in n.input}
    for name in (w_name, b_name):
        if name and name not in used:
            g.initializer.remove(inits[name])
    at = list(g.node).index(conv)
    for k, n in enumerate(nodes):
        g.node.insert(at + k, n)
    return model, pre, [n.name for n in nodes]


def _grid_conv(model: onnx.ModelProto, grid: str) -> onnx.NodeProto:
    """The Conv reading the pixel grid: directly (fp32 model) or through Q/DQ (QDQ model)."""
    prod = producers(model)
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        src = n.input[0]
        if src in prod and prod[src].op_type == "DequantizeLinear":
            q = prod.get(prod[src].input[0])
            src = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else src
        if src == grid:
            return n
    raise QuenchError(f"no Conv reads {grid!r}")


# --------------------------------------------------------------------------------------------
# GPTQ rounding of the grid Conv


def _grid_patches(
    model: onnx.ModelProto, grid: str, x: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> Iterator[np.ndarray]:
    """Per image, the input patches ``[positions, C * kh * kw]`` of the grid Conv: whole pixel
    values, the padding taps being ``mean`` rounded, as the quantized graph sees them."""
    conv = _grid_conv(model, grid)
    inits = {t.name: t for t in model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    kh, kw = inits[conv.input[1]].dims[2:]
    sh, sw = list(attrs.get("strides", [1, 1]))
    dh, dw = list(attrs.get("dilations", [1, 1]))
    pads = [0] * 8
    if f"{grid}_pads" in inits:
        pads = [int(v) for v in numpy_helper.to_array(inits[f"{grid}_pads"])]
    m = np.asarray(mean, np.float64)[:, None, None]
    s = np.asarray(std, np.float64)[:, None, None]
    spread = ((pads[2], pads[6]), (pads[3], pads[7]))
    for img in x:
        padded = np.pad(img.astype(np.float64), ((0, 0), *spread))
        p = np.clip(np.round(padded * s + m), 0, 255)
        win = np.lib.stride_tricks.sliding_window_view(
            p, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(1, 2)
        )[:, ::sh, ::sw, ::dh, ::dw]
        yield win.transpose(1, 2, 0, 3, 4).reshape(-1, p.shape[0] * kh * kw)


def grid_moments(
    model: onnx.ModelProto, grid: str, x: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """``E[p p^T]`` over the grid Conv's input patches ``p`` on the calibration images."""
    total: np.ndarray | None = None
    n = 0
    for cols in _grid_patches(model, grid, x, mean, std):
        part = cols.T @ cols
        total = part if total is None else total + part
        n += len(cols)
    assert total is not None
    return total / max(n, 1)


def _gptq_round(
    w: np.ndarray, scale: np.ndarray, moments: np.ndarray, wmax: int = 127
) -> np.ndarray:
    """Int8 weights ``q`` in [-wmax, wmax] (per-row ``scale``) minimising
    ``E[((q * scale - w) . p)^2]``.

    GPTQ: round one input column at a time and spread its error over the columns not yet
    rounded, weighted by the upper Cholesky factor of ``H^-1`` (``H`` the input second moments,
    damped by 1% of its mean diagonal).
    """
    rows = w.reshape(len(w), -1).astype(np.float64).copy()
    d = rows.shape[1]
    h = moments + 0.01 * float(np.mean(np.diag(moments))) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (len(rows),))
    q = np.zeros_like(rows)
    for i in range(d):
        q[:, i] = np.clip(np.round(rows[:, i] / s), -wmax, wmax)
        err = (rows[:, i] - q[:, i] * s) / u[i, i]
        rows[:, i + 1 :] -= np.outer(err, u[i, i + 1 :])
    return q.reshape(w.shape).astype(np.int8)


def _grid_weights(
    qdq: onnx.ModelProto, fp32: onnx.ModelProto, grid: str
) -> tuple[onnx.TensorProto, np.ndarray, np.ndarray]:
    """The grid Conv's int8 weight tensor in ``qdq``, its per-row scale and the float weights."""
    inits = {t.name: t for t in qdq.graph.initializer}
    wdq = producers(qdq)[_grid_conv(qdq, grid).input[1]]
    if wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
        raise QuenchError("the pixel-grid Conv has no quantized weights")
    fp_inits = {t.name: t for t in fp32.graph.initializer}
    w = numpy_helper.to_array(fp_inits[_grid_conv(fp32, grid).input[1]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[wdq.input[1]]).astype(np.float64)
    if quant_axis(wdq) % w.ndim != 0 and scale.size > 1:
        raise QuenchError("the pixel-grid Conv's weights are not quantized per output channel")
    return inits[wdq.input[0]], np.broadcast_to(scale.reshape(-1), (len(w),)), w


def gptq_first_layer(
    qdq: onnx.ModelProto, fp32: onnx.ModelProto, grid: str, moments: np.ndarray, wmax: int
) -> None:
    """Re-round the pixel-grid Conv's int8 weights in ``qdq`` by GPTQ (scales unchanged)."""
    tensor, scale, w = _grid_weights(qdq, fp32, grid)
    tensor.CopyFrom(numpy_helper.from_array(_gptq_round(w, scale, moments, wmax), tensor.name))


def first_layer_error(
    qdq: onnx.ModelProto, fp32: onnx.ModelProto, grid: str, moments: np.ndarray, wmax: int
) -> dict[str, float]:
    """Mean squared output error of the grid Conv (pixel units), as rounded vs to nearest."""
    tensor, scale, w = _grid_weights(qdq, fp32, grid)
    rows = w.reshape(len(w), -1)
    nearest = np.clip(np.round(rows / scale[:, None]), -wmax, wmax)
    used = numpy_helper.to_array(tensor).reshape(len(w), -1).astype(np.float64)

    def err(q: np.ndarray) -> float:
        e = q * scale[:, None] - rows
        return float(np.einsum("oi,ij,oj->", e, moments, e) / len(rows))

    return {"rounded": err(used), "nearest": err(nearest)}
