"""Reading and checking an ONNX classifier, and setting its batch policy."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, version_converter
from onnx.external_data_helper import load_external_data_for_model

from quench.backend.onnxruntime.session import session
from quench.errors import ModelError
from quench.external_data import external_data
from quench.presets import Preset


@dataclass
class SourceModel:
    path: Path
    model: onnx.ModelProto
    sha256: str
    size: int

    @property
    def opset(self) -> int:
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def describe(self) -> dict[str, object]:
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "size": self.size,
            "opset": self.opset,
            "producer": f"{self.model.producer_name} {self.model.producer_version}".strip(),
        }


def load_model(path: str | Path) -> SourceModel:
    """Load and check an ONNX model; ModelError with the file name when it is not valid."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    if external_data(model):  # inline it: an artifact is one self-contained file
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # missing file, a location outside the folder, bad offsets
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{path}: cannot read its external data ({first})") from None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise ModelError(f"{path}: invalid ONNX model ({first})") from None
    return SourceModel(path, model, hashlib.sha256(data).hexdigest(), len(data))


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs fed at run time: initializers listed as inputs (IR < 4) left out."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def shape_of(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
        for d in vi.type.tensor_type.shape.dim
    ]


def find_io(model: onnx.ModelProto, preset: Preset, source: str) -> tuple[str, str]:
    """The image input and class-score output names; checks them against the preset."""
    inputs = real_inputs(model)
    outputs = list(model.graph.output)
    if len(inputs) != 1:
        raise ModelError(
            f"{source}: expected one image input, found {len(inputs)}: {[i.name for i in inputs]}"
        )
    inp = inputs[0]
    out = next(
        (o for o in outputs if o.name == preset.output_name), outputs[0] if outputs else None
    )
    if out is None:
        raise ModelError(f"{source}: the model has no outputs")
    if preset.input_name and inp.name != preset.input_name:
        raise ModelError(
            f"{source}: input is {inp.name!r} but preset {preset.name} expects "
            f"{preset.input_name!r}; choose another --preset or none"
        )
    if preset.output_name and out.name != preset.output_name:
        raise ModelError(
            f"{source}: no output {preset.output_name!r} (preset {preset.name}); outputs are "
            f"{[o.name for o in outputs]}"
        )
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ModelError(f"{source}: input {inp.name!r} must be float32")
    dims = shape_of(inp)
    expected = preset.data.input_shape
    if len(dims) != 4 or any(
        isinstance(d, int) and d != e for d, e in zip(dims[1:], expected, strict=True)
    ):
        raise ModelError(
            f"{source}: input {inp.name!r} has shape {dims}, expected [N, "
            f"{', '.join(map(str, expected))}] for {preset.data.layout} "
            f"{preset.data.crop}x{preset.data.crop} (set --crop/--layout or another preset)"
        )
    odims = shape_of(out)
    if len(odims) != 2:
        raise ModelError(f"{source}: output {out.name!r} has shape {odims}, expected [N, classes]")
    return inp.name, out.name


def num_classes(model: onnx.ModelProto, output_name: str) -> int | None:
    out = next(o for o in model.graph.output if o.name == output_name)
    d = shape_of(out)[1]
    return d if isinstance(d, int) else None


def set_batch(model: onnx.ModelProto, batch: int | None, symbol: str = "N") -> onnx.ModelProto:
    """Copy of the model with the batch dimension of every input/output fixed or symbolic."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in [*real_inputs(m), *m.graph.output]:
        dim = vi.type.tensor_type.shape.dim[0]
        if batch is None:
            dim.Clear()
            dim.dim_param = symbol
        else:
            dim.Clear()
            dim.dim_value = batch
    del m.graph.value_info[:]  # stale intermediate shapes may pin the old batch
    return m


def count_macs(model: onnx.ModelProto, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per image of the Conv, Gemm and MatMul nodes.

    Shapes come from running the model once (ONNX Runtime, every node's output exposed) on a
    batch of 1, or of the fixed batch a model that runs only at one batch declares, so models
    whose shapes static inference cannot resolve are counted too.
    """
    dims = real_inputs(model)[0].type.tensor_type.shape.dim
    batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else 0
    batch = batch if batch > 0 else 1
    m = set_batch(model, batch)
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    wanted = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    have = {o.name for o in m.graph.output}
    probe = {t for n in wanted for t in (n.output[0], n.input[0], n.input[1]) if t not in inits}
    for name in sorted(probe - have):
        m.graph.output.append(onnx.ValueInfoProto(name=name))
    sess = session(m, optimization="disable")
    inp = real_inputs(m)[0].name
    names = [o.name for o in sess.get_outputs()]
    x = np.zeros((batch, *input_shape), np.float32)
    shapes = {n: a.shape for n, a in zip(names, sess.run(names, {inp: x}), strict=True)}
    shapes.update(inits)
    macs = 0
    for n in wanted:
        out = int(np.prod(shapes[n.output[0]]))
        if n.op_type == "Conv":
            macs += out * int(np.prod(shapes[n.input[1]][1:]))
        elif n.op_type == "Gemm":
            trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
            a = shapes[n.input[0]]
            macs += out * int(a[0] if trans_a else a[1])
        else:
            macs += out * int(shapes[n.input[0]][-1])
    return macs // batch


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model at ``opset`` or newer (INT8 per-channel DequantizeLinear needs opset 13).

    Initializers are also dropped from the graph inputs (IR >= 4), so that optimisers may fold
    them as constants.
    """
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current < opset:
        try:
            model = version_converter.convert_version(model, opset)
        except Exception as exc:  # the converter raises assorted errors
            raise ModelError(f"cannot convert the model to opset {opset}: {exc}") from None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.ir_version = max(m.ir_version, 7)
    keep = real_inputs(m)
    del m.graph.input[:]
    m.graph.input.extend(keep)
    return m
