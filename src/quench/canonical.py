"""The canonical form of a classifier graph: what Quench changes in a model before it builds.

Models come from the ONNX model zoo (Caffe2 era, IR 3, opset 7-9), torchvision, timm and other
exporters. Each rewrite here turns one ordinary form into the one the build works with, and is
recorded (:class:`Rewrite`) for the manifest:

- ``initializers_out``: weights listed among the graph inputs (IR < 4) are moved out, as ONNX
  Runtime's ``remove_initializer_from_input`` tool does (ORT then folds them as constants and
  stops warning once per weight);
- ``squeeze_head``: an ``[N, C, 1, 1]`` (or ``[N, 1, 1, C]``...) class output becomes
  ``[N, C]`` through a ``Flatten`` appended after it;
- :func:`output_kind`: whether the class output is a softmax (probabilities) or logits.

The batch dimension is :mod:`quench.batch_form`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from quench.graph import shape_of

# ops that pass a tensor on without changing what its values mean
_PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Identity", "Dropout", "Unsqueeze")
SOFTMAX = ("Softmax", "LogSoftmax")


@dataclass(frozen=True)
class Rewrite:
    """One change Quench made to the source graph, for the manifest."""

    kind: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "detail": self.detail}


def canonical(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Rewrite]]:
    """``model`` with weights out of its inputs and ``[N, C, 1, 1]`` heads squeezed: a copy
    when anything changes, else ``model`` itself (a ResNet-50 is 100 MB)."""
    inits = {t.name for t in model.graph.initializer}
    if not any(i.name in inits for i in model.graph.input) and not any(
        _squeezable(o) for o in model.graph.output
    ):
        return model, []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rewrites = [r for r in (initializers_out(m), *squeeze_heads(m)) if r is not None]
    return m, rewrites


def initializers_out(model: onnx.ModelProto) -> Rewrite | None:
    """Drop the initializers from the graph inputs in place (IR >= 4 allows it)."""
    inits = {t.name for t in model.graph.initializer}
    listed = [i for i in model.graph.input if i.name in inits]
    if not listed:
        return None
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.ir_version = max(model.ir_version, 4)
    return Rewrite(
        "initializers_out", f"{len(listed)} weights listed among the graph inputs moved out"
    )


def _squeezable(out: onnx.ValueInfoProto) -> bool:
    """``[N, C, 1, 1]``-like: rank > 2, every dimension but the batch and one other is 1."""
    dims = shape_of(out)
    return len(dims) > 2 and sum(1 for d in dims[1:] if d != 1) == 1


def squeeze_heads(model: onnx.ModelProto) -> list[Rewrite]:
    """Flatten, in place, every graph output shaped ``[N, ..., C, ...]`` with all other dims 1."""
    done = []
    for out in model.graph.output:
        if not _squeezable(out):
            continue
        dims = shape_of(out)
        classes = next(d for d in dims[1:] if d != 1)
        inner = f"{out.name}/unsqueezed"
        for node in model.graph.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        model.graph.node.append(
            helper.make_node(
                "Flatten", [inner], [out.name], name=f"{out.name}/squeeze_head", axis=1
            )
        )
        shape = out.type.tensor_type.shape
        batch = onnx.TensorShapeProto.Dimension()
        batch.CopyFrom(shape.dim[0])
        del shape.dim[:]
        shape.dim.add().CopyFrom(batch)
        d = shape.dim.add()
        if isinstance(classes, int):
            d.dim_value = classes
        else:
            d.dim_param = str(classes)
        done.append(
            Rewrite(
                "squeeze_head",
                f"output {out.name!r} {dims} flattened to [N, {classes}] (a Flatten node added)",
            )
        )
    return done


def output_kind(model: onnx.ModelProto, output_name: str) -> str | None:
    """``probabilities`` when ``output_name`` is a softmax (through reshapes), else ``None`` (the
    graph does not say: logits, or a log-softmax, whose softmax is the probabilities too)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    name = output_name
    for _ in range(len(model.graph.node)):
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type in SOFTMAX:
            return "probabilities" if node.op_type == "Softmax" else None
        if node.op_type not in _PASS_THROUGH or not node.input:
            return None
        name = node.input[0]
    return None


def softmax_nodes(model: onnx.ModelProto, output_name: str) -> list[str]:
    """The names of the nodes from the final softmax to ``output_name`` (empty without one):
    what INT8 keeps in float so that the class scores are not rounded to 8 bits."""
    producers = {o: n for n in model.graph.node for o in n.output}
    chain, name = [], output_name
    for _ in range(len(model.graph.node)):
        node = producers.get(name)
        if node is None or (node.op_type not in SOFTMAX and node.op_type not in _PASS_THROUGH):
            return []
        chain.append(node.name)
        if node.op_type in SOFTMAX:
            return chain
        if not node.input:
            return []
        name = node.input[0]
    return []
