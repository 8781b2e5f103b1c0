"""An ONNX classifier graph as a torch module: each node becomes a torch call (:mod:`.ops`).

Only data is read from the model (the graph, its attributes and weights): nothing in it is run
as code. Nodes whose inputs are all constants are computed once here, and their results kept
as constants. An operator or form without a translation is refused in one line naming the
node (:class:`~quench.errors.ModelError`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from quench.backend.torch import ops, shapes
from quench.backend.torch.ops import Floats, Unsupported, cast
from quench.errors import ModelError

MIN_OPSET = 7
MAKERS = {**ops.MAKERS, **shapes.MAKERS}
# outputs an inference graph may declare but nothing may read (training statistics, masks)
_EXTRA_OUTPUTS_OK = ("BatchNormalization", "Dropout")


@dataclass(frozen=True)
class Step:
    """One node: the function, the names of its inputs ("" for a left-out one) and outputs."""

    fn: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    label: str  # "Conv node 'conv1'", for errors
    op: str


class OnnxModule(torch.nn.Module):
    """The translated graph: weights and constants as buffers, nodes run in graph order."""

    def __init__(
        self,
        steps: list[Step],
        inputs: list[str],
        outputs: list[str],
        constants: dict[str, torch.Tensor],
        floats: Floats,
    ) -> None:
        super().__init__()
        self.steps = steps
        self.input_names = inputs
        self.output_names = outputs
        self.floats = floats
        # Shape nodes left to run: their consumers (a Reshape) see a tensor, which
        # torch.compile cannot turn into sizes without breaking the graph
        self.runtime_shapes = any(s.op == "Shape" for s in steps)
        self._constants: dict[str, str] = {}
        for i, (name, value) in enumerate(constants.items()):
            self.register_buffer(f"c{i}", value)
            self._constants[name] = f"c{i}"

    def share_constants(self, other: OnnxModule) -> None:
        """Use ``other``'s tensor for each constant both hold with equal values (one copy of
        the weights for several batch-specialised modules on one device)."""
        for name, attr in self._constants.items():
            theirs = getattr(other, other._constants.get(name, ""), None)
            mine = getattr(self, attr)
            if (
                isinstance(theirs, torch.Tensor)
                and (theirs.shape, theirs.dtype, theirs.device)
                == (mine.shape, mine.dtype, mine.device)
                and torch.equal(theirs, mine)
            ):
                setattr(self, attr, theirs)

    def set_float_type(self, dtype: torch.dtype) -> OnnxModule:
        """Compute in ``dtype``: float weights converted, Cast-to-float casts to it."""
        self.floats.dtype = dtype
        return self.to(dtype)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._run(xs, None)

    def shape_values(self, *xs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs of the Shape nodes left to run, on ``xs`` (run once, eagerly)."""
        record: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            self._run(xs, record)
        return record

    def _run(self, xs: tuple[torch.Tensor, ...], record: dict | None) -> tuple[torch.Tensor, ...]:
        env: dict[str, Any] = {"": None}
        env.update({name: getattr(self, attr) for name, attr in self._constants.items()})
        env.update(zip(self.input_names, xs, strict=True))
        for step in self.steps:
            out = step.fn(*(env[n] for n in step.inputs))
            if record is not None and step.op == "Shape":
                record[step.outputs[0]] = out
            if len(step.outputs) == 1:
                env[step.outputs[0]] = out
            else:
                env.update(zip(step.outputs, out, strict=False))
        return tuple(env[n] for n in self.output_names)


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def translate(
    model: onnx.ModelProto,
    where: str = "model",
    shapes: dict[str, torch.Tensor] | None = None,
) -> OnnxModule:
    """``model`` as an :class:`OnnxModule`; :class:`ModelError` naming the first node (or
    the opset) that does not translate. ``shapes``: Shape nodes' outputs at one input shape
    (:meth:`OnnxModule.shape_values`), made constants of a module for that shape alone."""
    opset = opset_of(model)
    if opset < MIN_OPSET:
        raise ModelError(f"{where}: ONNX opset {opset} is older than {MIN_OPSET}: no translation")
    check_extra_outputs(model, where)
    g = model.graph
    consts: dict[str, torch.Tensor] = {}
    for init in g.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelError(f"{where}: weight {init.name!r} is stored in another file")
        consts[init.name] = torch.from_numpy(np.array(numpy_helper.to_array(init)))
    steps: list[Step] = []
    floats = Floats()

    for node in g.node:
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        try:
            folded = _node(node, opset, consts, steps, label, floats, shapes or {})
        except (Unsupported, KeyError, ValueError, TypeError, IndexError) as exc:
            why = str(exc) if isinstance(exc, Unsupported) else f"{type(exc).__name__}: {exc}"
            raise ModelError(f"{where}: {label} does not translate to torch: {why}") from None
        consts.update(folded)
    inputs = [i.name for i in g.input if i.name not in consts]
    outputs = [o.name for o in g.output]
    used = {n for s in steps for n in s.inputs} | set(outputs)
    kept = {name: value for name, value in consts.items() if name in used}
    return OnnxModule(steps, inputs, outputs, kept, floats)


def _node(
    node: onnx.NodeProto,
    opset: int,
    consts: dict[str, torch.Tensor],
    steps: list[Step],
    label: str,
    floats: Floats,
    shapes: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Append ``node``'s step, or compute it now when its inputs are all constants or it is
    a Shape given in ``shapes`` (its outputs are then new constants)."""
    if node.domain not in ("", "ai.onnx"):
        raise Unsupported(f"its operator domain {node.domain!r} is not the standard one")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Constant":
        return {node.output[0]: _constant(attrs)}
    if node.op_type == "Shape" and node.output[0] in shapes:
        return {node.output[0]: shapes[node.output[0]].cpu()}
    maker = MAKERS.get(node.op_type)
    if maker is None:
        raise Unsupported("no translation for this operator")
    outputs = tuple(node.output)
    if len([o for o in outputs if o]) > 1 and node.op_type in _EXTRA_OUTPUTS_OK:
        outputs = outputs[:1]  # the others are checked unread below
    elif len(outputs) > 1:
        raise Unsupported("it has more than one output")
    known = [consts.get(n, torch.empty(0)) if n == "" else consts.get(n) for n in node.input]
    if node.input and all(v is not None for v in known):  # computed once, here
        fn = maker(attrs, known, opset)
        with torch.no_grad():
            value = fn(*(None if n == "" else consts[n] for n in node.input))
        return {outputs[0]: value}
    fn = cast(attrs, known, opset, floats) if node.op_type == "Cast" else maker(attrs, known, opset)
    steps.append(Step(fn, tuple(node.input), outputs, label, node.op_type))
    return {}


def check_extra_outputs(model: onnx.ModelProto, where: str = "model") -> None:
    """Refuse a graph that reads a BatchNormalization's running statistics or a Dropout's mask
    (training-only outputs the translation does not compute)."""
    extra = {
        out: node
        for node in model.graph.node
        if node.op_type in _EXTRA_OUTPUTS_OK
        for out in node.output[1:]
        if out
    }
    readers = [i for n in model.graph.node for i in n.input] + [o.name for o in model.graph.output]
    for name in readers:
        if name in extra:
            node = extra[name]
            raise ModelError(
                f"{where}: {node.op_type} node {node.name or node.output[0]!r} does not "
                f"translate to torch: its training output {name!r} is read"
            )


def _constant(attrs: dict[str, Any]) -> torch.Tensor:
    if "value" in attrs:
        return torch.from_numpy(np.array(numpy_helper.to_array(attrs["value"])))
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return torch.tensor(np.array(attrs[key], dtype))
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return torch.from_numpy(np.array(attrs[key], dtype))
    raise Unsupported(f"it is a Constant with {', '.join(attrs)} (no tensor value)")
