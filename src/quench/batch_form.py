"""The batch dimension a graph really has: declared, probed, and made mutable where it is safe.

Exported classifiers often run at one batch only: the input declares ``[1, 3, 224, 224]``, or a
``Reshape`` to ``[1, -1]`` after global pooling (or a channel shuffle's ``[1, g, c/g, h, w]``)
hard-codes the batch. :func:`probe` runs the model (ONNX Runtime, no optimisation) to find out,
instead of guessing from names or shapes:

1. at its declared batch ``B`` (1 when symbolic): it must run there;
2. at ``2B`` with the batch dimension made symbolic: when the output rows equal the model's own
   outputs on each half, the graph is batch-mutable as it is;
3. else each ``Reshape`` whose constant shape starts with ``B`` gets ``0`` there ("copy the
   input's dimension", so the batch flows through) and step 2 is repeated on the result: only a
   rewrite that reproduces the original's outputs is kept, and it is recorded.

Otherwise the graph only runs at ``B`` (:attr:`BatchForm.why` says which node and why), and
every run of it goes in chunks of ``B`` (:class:`quench.backend.onnxruntime.session.Session`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from quench.backend.onnxruntime.session import session
from quench.canonical import Rewrite
from quench.errors import EngineError, ModelError
from quench.graph import real_inputs, set_batch

RTOL = 1e-4  # outputs at 2B against the per-half outputs, relative to their largest value


@dataclass
class BatchForm:
    """What batch sizes a graph runs, and the graph to run them with."""

    declared: int | None  # the input's declared batch; None when symbolic
    mutable: onnx.ModelProto | None  # symbolic batch, checked to run any batch; None if not
    only: int  # the batch it runs when it is not mutable (the declared one, or 1)
    rewrites: list[Rewrite] = field(default_factory=list)  # what made it mutable
    why: str = ""  # why it is not batch-mutable as it is (the engine's one line)

    @property
    def native(self) -> bool:
        """Batch-mutable without any rewrite."""
        return self.mutable is not None and not self.rewrites

    def to_dict(self) -> dict[str, object]:
        """The manifest's record (``source.batch``)."""
        d: dict[str, object] = {"declared": self.declared, "mutable": self.mutable is not None}
        if not self.native:
            d["as_exported"] = f"runs only at batch {self.only}: {self.why}"
        return d


IF_POSSIBLE = "if_possible"  # BuildOptions.dynamic_batch: mutable where a checked form exists


def policy(
    form: BatchForm, batch: int | None, dynamic: bool | str | None, source: str
) -> tuple[int | None, str]:
    """The build's batch (None: mutable) for ``--batch`` / ``--dynamic-batch`` (None: neither;
    :data:`IF_POSSIBLE`: mutable where it can be, as ``quench run`` times several batch sizes),
    and one line saying what was chosen and why; :class:`ModelError` when the graph cannot
    run what was asked."""
    only, why = form.only, form.why
    rewrite = "; ".join(r.detail for r in form.rewrites)
    if batch is not None:
        if form.mutable is None and batch != only:
            raise ModelError(
                f"{source}: the model runs only at batch {only} ({why}) and no checked rewrite "
                f"makes its batch mutable; build with --batch {only}"
            )
        return batch, f"batch: fixed at {batch} (--batch)"
    asked = "--dynamic-batch" if dynamic is True else "mutable where it can be"
    if dynamic == IF_POSSIBLE and form.mutable is not None:
        dynamic = True
    if dynamic is True:
        if form.mutable is None:
            raise ModelError(
                f"{source}: cannot make the batch mutable: the model runs only at batch {only} "
                f"({why}) and no checked rewrite changes that; build with --batch {only}"
            )
        if form.rewrites:
            return None, f"batch: mutable ({asked}), the graph rewritten: {rewrite}"
        return None, f"batch: mutable ({asked}; checked at batch {2 * only})"
    if form.native and form.declared is None:
        return None, "batch: mutable (the input's batch is symbolic; checked at batch 2)"
    if form.declared is not None:
        cause = f"the input declares batch {form.declared}"
        if form.native:
            cause += " (the graph runs any batch)"
    else:
        cause = f"the graph runs only at batch {only} ({why})"
    if form.mutable is not None:
        hint = "--dynamic-batch makes it mutable" + (f" ({rewrite})" if rewrite else "")
    else:
        hint = "it cannot be made mutable" + (f" ({why})" if form.declared is not None else "")
    return only, f"batch: fixed at {only}: {cause}; {hint}"


def _run(model: onnx.ModelProto, input_name: str, x: np.ndarray) -> np.ndarray:
    sess = session(model, optimization="disable")
    return sess.run(None, {input_name: x})[0]


def probe(model: onnx.ModelProto, input_shape: tuple[int, ...], source: str) -> BatchForm:
    """Find the batch sizes ``model`` (one image input) runs; ``input_shape`` is per image."""
    inp = real_inputs(model)[0]
    dim = inp.type.tensor_type.shape.dim[0] if inp.type.tensor_type.shape.dim else None
    declared = dim.dim_value if dim is not None and dim.HasField("dim_value") else None
    declared = declared if declared and declared > 0 else None
    b = declared or 1
    rng = np.random.default_rng(20261204)
    halves = [rng.standard_normal((b, *input_shape)).astype(np.float32) for _ in range(2)]
    try:  # the model as it is runs batch ``b``
        expected = np.concatenate([_run(model, inp.name, h) for h in halves])
    except EngineError as exc:
        raise ModelError(f"{source}: the model does not run at batch {b}: {exc}") from None
    dynamic = set_batch(model, None)
    why = _mismatch(dynamic, inp.name, halves, expected)
    if why is None:
        return BatchForm(declared, dynamic, b)
    rewritten, rewrites = reshape_batch_to_zero(dynamic, b)
    if rewrites and _mismatch(rewritten, inp.name, halves, expected) is None:
        return BatchForm(declared, rewritten, b, rewrites, why)
    return BatchForm(declared, None, b, [], why)


def _mismatch(
    model: onnx.ModelProto, input_name: str, halves: list[np.ndarray], expected: np.ndarray
) -> str | None:
    """Why ``model`` at batch 2B does not reproduce ``expected`` (None when it does)."""
    try:
        got = _run(model, input_name, np.concatenate(halves))
    except EngineError as exc:
        return str(exc)
    if got.shape != expected.shape:
        return f"at batch {len(expected)} its output has shape {list(got.shape)}"
    scale = float(np.max(np.abs(expected))) or 1.0
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    if not diff <= RTOL * scale:
        return f"at batch {len(expected)} its outputs differ from batch {len(expected) // 2}'s"
    return None


def reshape_batch_to_zero(model: onnx.ModelProto, batch: int) -> tuple[onnx.ModelProto, list]:
    """A copy of ``model`` whose ``Reshape`` constant shapes starting with ``batch`` start with 0
    instead (the input's first dimension), and one :class:`Rewrite` per changed node."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    constants = {
        n.output[0]: n for n in m.graph.node if n.op_type == "Constant" and len(n.output) == 1
    }
    uses: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    rewrites = []
    for node in m.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue  # 0 would mean a zero-sized dimension there
        name = node.input[1]
        tensor = _constant(name, inits, constants)
        if tensor is None:
            continue
        shape = numpy_helper.to_array(tensor)
        if shape.ndim != 1 or not len(shape) or int(shape[0]) != batch:
            continue
        new = shape.copy()
        new[0] = 0
        if name in inits and uses.get(name, 0) == 1:
            inits[name].CopyFrom(numpy_helper.from_array(new, name))
        else:  # a Constant node's output, or a shape other nodes read too
            fresh = f"{name}/batch0/{len(rewrites)}"
            m.graph.initializer.append(numpy_helper.from_array(new, fresh))
            node.input[1] = fresh
        rewrites.append(
            Rewrite(
                "reshape_batch",
                f"Reshape {node.name or node.output[0]!r} shape {shape.tolist()} -> "
                f"{new.tolist()} (batch taken from its input)",
            )
        )
    return m, rewrites


def _constant(
    name: str, inits: dict[str, onnx.TensorProto], constants: dict[str, onnx.NodeProto]
) -> onnx.TensorProto | None:
    if name in inits:
        return inits[name]
    node = constants.get(name)
    if node is None:
        return None
    attr = next((a for a in node.attribute if a.name == "value"), None)
    return attr.t if attr is not None and attr.HasField("t") else None
