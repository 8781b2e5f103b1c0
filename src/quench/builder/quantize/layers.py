"""The quantizable layers of a QDQ model, and the same model with some of them in float.

A *layer* is a Conv, ConvTranspose, Gemm or MatMul node that reads quantized data (an input
through DequantizeLinear). :func:`with_float_layers` is the cheap what-if the sensitivity analysis
runs once per layer: the named layers read their float input and their original float weights
and bias (from the float model the QDQ model was made of), everything else stays as quantized.
The build's real mixed-precision model is made by quantizing again with those nodes excluded
(``QuantConfig.exclude``); this edit only predicts it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx

from quench.builder.quantize.qdq import drop_unread_qdq, producers
from quench.errors import QuenchError

OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Layer:
    name: str  # the ONNX node name
    op: str
    output: str  # the tensor it writes
    precision: str  # "int8" (reads quantized data) or "float"


def layers(qdq: onnx.ModelProto) -> list[Layer]:
    """Every Conv/ConvTranspose/Gemm/MatMul node of ``qdq`` in graph order, with its precision."""
    prod = producers(qdq)
    out: list[Layer] = []
    for n in qdq.graph.node:
        if n.op_type not in OPS:
            continue
        quantized = any(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input if i)
        out.append(Layer(n.name, n.op_type, n.output[0], "int8" if quantized else "float"))
    return out


def check_names(names: Iterable[str], known: Sequence[str], what: str = "layer") -> list[str]:
    """``names`` if each is in ``known``; else a one-line error naming the closest real names."""
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise QuenchError(f"unknown {what} {name!r}{hint} (`quench diagnose` lists them)")
    return names


def with_float_layers(
    qdq: onnx.ModelProto, float_model: onnx.ModelProto, names: Iterable[str]
) -> onnx.ModelProto:
    """A copy of ``qdq`` in which the layers ``names`` compute in float.

    Each reads the float tensor in front of its input's QuantizeLinear/DequantizeLinear pair and
    the weights and bias of the same-named node of ``float_model`` (the graph the QDQ model was
    made from, before bias correction). The QDQ nodes left without a reader are removed.
    """
    wanted = set(names)
    if not wanted:
        return qdq
    out = onnx.ModelProto()
    out.CopyFrom(qdq)
    prod = producers(out)
    float_nodes = {n.name: n for n in float_model.graph.node}
    float_inits = {t.name: t for t in float_model.graph.initializer}
    have = {t.name for t in out.graph.initializer}
    added: dict[str, str] = {}
    for node in list(out.graph.node):
        if node.name not in wanted:
            continue
        ref = float_nodes.get(node.name)
        if ref is None or ref.op_type != node.op_type or len(ref.input) > len(node.input):
            raise QuenchError(f"layer {node.name!r} has no float counterpart")
        # bias correction gives a bias-less Conv/Gemm a bias: in float it has none
        del node.input[len(ref.input) :]
        for k, name in enumerate(node.input):
            if not name:
                continue
            dq = prod.get(name)
            if ref.input[k] in float_inits:  # a weight or bias: the original float values
                # under a name of its own: the QDQ graph may use the float name for the
                # DequantizeLinear output that replaced it
                own = f"{ref.input[k]}__float"
                if own not in have:
                    init = onnx.TensorProto()
                    init.CopyFrom(float_inits[ref.input[k]])
                    init.name = own
                    out.graph.initializer.append(init)
                    have.add(own)
                node.input[k] = own
            elif dq is not None and dq.op_type == "DequantizeLinear":
                q = prod.get(dq.input[0])
                if q is not None and q.op_type == "QuantizeLinear":
                    # the activation before its fake quantization
                    node.input[k] = _activation(out, prod, float_model, q.input[0], added)
    _drop_unread(out)
    return out


def _activation(
    out: onnx.ModelProto,
    prod: dict[str, onnx.NodeProto],
    float_model: onnx.ModelProto,
    name: str,
    added: dict[str, str],
) -> str:
    """The float tensor ``name`` as the float model computes it.

    ONNX Runtime's quantizer drops a Relu or Clip that follows a quantized node and lets the
    QuantizeLinear's range clip instead; read without that QuantizeLinear, the tensor would be
    unclipped. Such a Relu/Clip is put back (once per tensor)."""
    if name in added:
        return added[name]
    ref = next((n for n in float_model.graph.node if name in n.output), None)
    here = prod.get(name)
    if ref is None or here is None or ref.op_type == here.op_type:
        return name
    if ref.op_type not in ("Relu", "Clip"):
        return name
    act = onnx.NodeProto()
    act.CopyFrom(ref)
    act.name = f"{ref.name}__float"
    act.input[0] = name
    del act.output[:]
    act.output.append(f"{name}__float")
    have = {t.name for t in out.graph.initializer}
    float_inits = {t.name: t for t in float_model.graph.initializer}
    for i in act.input[1:]:  # Clip's bounds
        if i and i not in have and i in float_inits:
            out.graph.initializer.append(float_inits[i])
    out.graph.node.append(act)  # moved behind its producer by _drop_unread's sort
    added[name] = act.output[0]
    return added[name]


def _drop_unread(model: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes and initializers nothing reads any more (repeated to a fixed point)."""
    g = model.graph
    drop_unread_qdq(g)
    _sort(g)
    read = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(keep)


def _sort(g: onnx.GraphProto) -> None:
    """Topological order, keeping the present order where it already is one."""
    written = {o for n in g.node for o in n.output}
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending = list(g.node)
    order: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready or i not in written for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise QuenchError("graph has a cycle")
        pending = rest
    sorted_nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in order]
    del g.node[:]
    g.node.extend(sorted_nodes)
