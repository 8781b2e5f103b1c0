"""Fused preprocessing in ONNX: a model whose input takes uint8 NHWC RGB pixels, with the
channel order, normalisation and layout change of its data config as the graph's first nodes.

ONNX Runtime compiles this form (``--input uint8``); OpenVINO does the same with its
``PrePostProcessor`` (:mod:`quench.backend.openvino.loader`). The arithmetic is the pipeline's
own (:class:`quench.imaging.Normalizer`): ``pixel * (1 / std) + (-mean / std)`` in float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quench.errors import ModelError
from quench.presets import DataConfig

MIN_OPSET = 6  # Cast's integer ``to`` attribute
PREFIX = "quench_preprocess"


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def fold(model: onnx.ModelProto, input_name: str, data: DataConfig) -> onnx.ModelProto:
    """A copy of ``model`` whose input ``input_name`` (float, ``data.layout``) takes uint8
    pixels (N, crop, crop, 3) RGB under the same name: Gather (BGR models), Transpose (NCHW
    models), Cast, Mul and Add feed what the input fed."""
    if _opset(model) < MIN_OPSET:
        raise ModelError(
            f"--input uint8 needs ONNX opset >= {MIN_OPSET}, the model has opset {_opset(model)}"
        )
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    weights = {t.name for t in g.initializer}  # (old IRs list weights as inputs too)
    inp = next((i for i in g.input if i.name == input_name and i.name not in weights), None)
    if inp is None:
        raise ModelError(f"the model has no input {input_name!r}")
    taken = {t for n in g.node for t in (*n.input, *n.output)} | weights
    taken |= {i.name for i in g.input} | {n.name for n in g.node}

    def name(stem: str) -> str:
        out, k = f"{PREFIX}_{stem}", 1
        while out in taken:
            out, k = f"{PREFIX}_{stem}_{k}", k + 1
        taken.add(out)
        return out

    normalized = name("normalized")
    for node in g.node:
        node.input[:] = [normalized if t == input_name else t for t in node.input]
    for out in g.output:
        if out.name == input_name:
            raise ModelError(f"input {input_name!r} is also an output of the model")

    mean, std = (np.asarray(v, np.float32) for v in data.channel_mean_std())
    scale, bias = 1.0 / std, -mean / std  # as quench.imaging.Normalizer computes them
    per_channel = (1, 3, 1, 1) if data.layout == "NCHW" else (3,)
    nodes, inits, x = [], [], input_name
    if data.channel_order == "BGR":
        idx = name("bgr")
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), idx))
        nodes.append(helper.make_node("Gather", [x, idx], [y := name("bgr_out")], axis=3))
        x = y
    if data.layout == "NCHW":
        nodes.append(helper.make_node("Transpose", [x], [y := name("nchw")], perm=[0, 3, 1, 2]))
        x = y
    nodes.append(helper.make_node("Cast", [x], [y := name("float")], to=TensorProto.FLOAT))
    s, b = name("scale"), name("bias")
    inits += [
        numpy_helper.from_array(scale.reshape(per_channel), s),
        numpy_helper.from_array(bias.reshape(per_channel), b),
    ]
    nodes.append(helper.make_node("Mul", [y, s], [z := name("scaled")]))
    nodes.append(helper.make_node("Add", [z, b], [normalized]))
    for node in nodes:
        node.name = name(node.op_type.lower())

    pixels = helper.make_tensor_value_info(
        input_name, TensorProto.UINT8, [None, data.crop, data.crop, 3]
    )
    if inp.type.tensor_type.shape.dim:  # the batch dimension as it was: fixed or named
        pixels.type.tensor_type.shape.dim[0].CopyFrom(inp.type.tensor_type.shape.dim[0])
    inp.CopyFrom(pixels)
    g.initializer.extend(inits)
    old = list(g.node)
    del g.node[:]
    g.node.extend([*nodes, *old])
    return m
