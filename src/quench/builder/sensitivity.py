"""Which layers cost accuracy: each quantized layer's output fidelity and its sensitivity.

Everything here runs the QDQ model on ONNX Runtime at its ``basic`` optimisation level, where
each QuantizeLinear/DequantizeLinear pair is computed as written (the int8 grid simulated in
float): the figures are the same on every CPU, whatever its int8 kernels.

- *Fidelity*: SQNR of each layer's output in the all-INT8 model against the same tensor of the
  float model, on the same images (how much error has piled up by that layer).
- *Sensitivity*: how much closer the logits come to fp32 when only that layer is put back in
  float (:func:`quench.builder.quantize.layers.with_float_layers`): the drop of the mean KL
  divergence of the softmax outputs from fp32's, and the top-1 agreement then reached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from quench.backend.onnxruntime.session import session
from quench.builder.quantize.layers import Layer, layers, with_float_layers
from quench.selfcheck import fidelity

Advance = Callable[[], None]
BATCH = 8


@dataclass
class Effect:
    """What the logits look like against fp32 for one model variant."""

    kl: float  # mean KL(fp32 softmax || variant softmax), nats
    top1_agreement: float

    def to_dict(self) -> dict[str, float]:
        return {"kl": round(self.kl, 6), "top1_agreement": round(self.top1_agreement, 4)}


@dataclass
class LayerFigures:
    layer: Layer
    sqnr_db: float | None = None  # output SQNR in the all-INT8 model
    kl_gain: float | None = None  # KL(all INT8) - KL(only this layer float); larger = guiltier
    agreement_if_float: float | None = None
    time_share: float | None = None  # of the engine's inference time (profiling)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.layer.name,
            "op": self.layer.op,
            "precision": self.layer.precision,
            "sqnr_db": _round(self.sqnr_db, 2),
            "kl_gain": _round(self.kl_gain, 6),
            "top1_agreement_if_float": _round(self.agreement_if_float, 4),
            "time_share": _round(self.time_share, 4),
        }


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


def run(
    model: onnx.ModelProto,
    input_name: str,
    x: np.ndarray,
    outputs: Sequence[str] = (),
    optimization: str = "basic",
) -> dict[str, np.ndarray]:
    """``model``'s graph outputs (and the extra tensors ``outputs``) for ``x``, in batches."""
    if outputs:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        # name only: ONNX Runtime infers the type (uint8 after a QuantizeLinear)
        m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in outputs if t not in have)
        model = m
    return run_feeds(model, {input_name: x}, optimization)


def run_feeds(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimization: str = "basic"
) -> dict[str, np.ndarray]:
    """``model``'s graph outputs for ``feeds`` (arrays with the same first dimension)."""
    sess = session(model, optimization=optimization)
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    n = len(next(iter(feeds.values())))
    for i in range(0, n, BATCH):
        batch = {k: v[i : i + BATCH] for k, v in feeds.items()}
        for name, v in zip(names, sess.run(names, batch), strict=True):
            parts[name].append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def effect(logits: np.ndarray, ref: np.ndarray) -> Effect:
    """Mean KL divergence of ``logits``' softmax from ``ref``'s, and top-1 agreement."""
    p, q = _log_softmax(ref.astype(np.float64)), _log_softmax(logits.astype(np.float64))
    kl = float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))
    return Effect(max(kl, 0.0), fidelity(logits, ref)["top1_agreement"])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))


def layer_sqnr(
    qdq: onnx.ModelProto, float_model: onnx.ModelProto, input_name: str, x: np.ndarray
) -> dict[str, float]:
    """Output SQNR (dB) of every layer of ``qdq`` against ``float_model``'s same tensor, taken
    where the next layer reads it (after its QuantizeLinear/DequantizeLinear pair, if any)."""
    found = {o for n in float_model.graph.node for o in n.output}
    seen = _seen_as(qdq)
    pairs = {
        layer.name: (seen.get(layer.output, layer.output), layer.output)
        for layer in layers(qdq)
        if layer.output in found
    }
    got = run(qdq, input_name, x, [q for q, _ in pairs.values()])
    ref = run(float_model, input_name, x, [f for _, f in pairs.values()])
    n = len(x)
    return {
        name: fidelity(got[q].reshape(n, -1), ref[f].reshape(n, -1))["sqnr_db"]
        for name, (q, f) in pairs.items()
    }


def _seen_as(qdq: onnx.ModelProto) -> dict[str, str]:
    """Tensor -> the DequantizeLinear output its readers see, where it is fake-quantized."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in qdq.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    out: dict[str, str] = {}
    for t, nodes in readers.items():
        q = next((n for n in nodes if n.op_type == "QuantizeLinear"), None)
        dq = q and next(
            (n for n in readers.get(q.output[0], []) if n.op_type == "DequantizeLinear"), None
        )
        if dq is not None:
            out[t] = dq.output[0]
    return out


def sensitivity(
    qdq: onnx.ModelProto,
    float_model: onnx.ModelProto,
    input_name: str,
    output_name: str,
    x: np.ndarray,
    ref: np.ndarray,
    names: Sequence[str],
    advance: Advance | None = None,
) -> tuple[Effect, dict[str, Effect]]:
    """The all-INT8 model's :class:`Effect` on ``x`` and, for each layer in ``names``, the
    effect with only that layer in float; ``ref`` are the fp32 logits of ``x``.

    A what-if differs from the all-INT8 model only from its layer on: the all-INT8 model runs
    once, keeping the tensors where those suffixes begin, and each what-if runs just its suffix
    (on average half the network) from them."""
    known = {i.name for i in qdq.graph.input} | {o for n in qdq.graph.node for o in n.output}
    suffixes = {}
    for name in names:
        variant = with_float_layers(qdq, float_model, [name])
        suffixes[name] = _suffix(variant, name, output_name, known)
    cut = sorted({t for _, inputs in suffixes.values() for t in inputs} - {input_name})
    acts = run(qdq, input_name, x, cut)
    acts[input_name] = x
    base = effect(acts[output_name], ref)
    # a graph that runs only at its fixed batch: so do its suffixes (ORT chunks the runs)
    dim0 = next(i for i in qdq.graph.input if i.name == input_name).type.tensor_type.shape.dim[0]
    batch: int | str = dim0.dim_value if dim0.HasField("dim_value") else "N"
    each: dict[str, Effect] = {}
    for name, (sub, inputs) in suffixes.items():
        sub.graph.input.extend(
            helper.make_tensor_value_info(
                t, helper.np_dtype_to_tensor_dtype(acts[t].dtype), [batch, *acts[t].shape[1:]]
            )
            for t in inputs
        )
        logits = run_feeds(sub, {t: acts[t] for t in inputs})[output_name]
        each[name] = effect(logits, ref)
        if advance:
            advance()
    return base, each


def _suffix(
    model: onnx.ModelProto, layer: str, output_name: str, known: set[str]
) -> tuple[onnx.ModelProto, list[str]]:
    """The part of ``model`` from ``layer`` to ``output_name`` (the layer, everything it feeds,
    and the nodes the what-if added in front of it), and the tensors it reads from the rest;
    its graph inputs are left for the caller to type."""
    g = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    start = next(n for n in g.node if n.name == layer)
    cone: set[str] = set()
    todo = [start]
    while todo:
        n = todo.pop()
        if n.name in cone:
            continue
        cone.add(n.name)
        todo.extend(r for o in n.output for r in readers.get(o, []))
    added = {o: n for n in g.node for o in n.output if o not in known}
    cone |= {added[i].name for i in start.input if i in added}
    # and the constant nodes they read (DequantizeLinear of a weight): not per image
    constant = {t.name for t in g.initializer}
    for n in g.node:
        if all(i in constant for i in n.input if i):
            constant.update(n.output)
    read = {i for n in g.node if n.name in cone for i in n.input}
    cone |= {n.name for n in g.node if any(o in read for o in n.output) and n.output[0] in constant}
    nodes = [n for n in g.node if n.name in cone]
    produced = {o for n in nodes for o in n.output}
    inits = {t.name: t for t in g.initializer}
    reads = list(dict.fromkeys(i for n in nodes for i in n.input if i))
    inputs = [i for i in reads if i not in produced and i not in inits]
    sub = helper.make_graph(
        nodes,
        f"{g.name}-from-{layer}",
        [],
        [o for o in g.output if o.name == output_name],
        [inits[i] for i in reads if i in inits],
    )
    out = helper.make_model(sub, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out, inputs


def rank(base: Effect, each: dict[str, Effect]) -> list[str]:
    """Layer names, most sensitive first: largest KL gain, then agreement, then name."""
    return sorted(each, key=lambda n: (-(base.kl - each[n].kl), -each[n].top1_agreement, n))
