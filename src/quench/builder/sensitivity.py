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
from onnx import TensorProto, helper

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
    model: onnx.ModelProto, input_name: str, x: np.ndarray, outputs: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """``model``'s graph outputs (and the extra tensors ``outputs``) for ``x``, in batches."""
    if outputs:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(
            helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
            for t in outputs
            if t not in have
        )
        model = m
    sess = session(model, optimization="basic")
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, len(x), BATCH):
        for n, v in zip(names, sess.run(names, {input_name: x[i : i + BATCH]}), strict=True):
            parts[n].append(v)
    return {n: np.concatenate(v) for n, v in parts.items()}


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
    effect with only that layer in float; ``ref`` are the fp32 logits of ``x``."""
    base = effect(run(qdq, input_name, x)[output_name], ref)
    each: dict[str, Effect] = {}
    for name in names:
        variant = with_float_layers(qdq, float_model, [name])
        each[name] = effect(run(variant, input_name, x)[output_name], ref)
        if advance:
            advance()
    return base, each


def rank(base: Effect, each: dict[str, Effect]) -> list[str]:
    """Layer names, most sensitive first: largest KL gain, then agreement, then name."""
    return sorted(each, key=lambda n: (-(base.kl - each[n].kl), -each[n].top1_agreement, n))
