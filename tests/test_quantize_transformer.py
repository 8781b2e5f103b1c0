"""INT8 on the graphs modern exporters write: a ViT-style attention block (class token
broadcast by the input's Shape, LayerNorm, attention MatMuls with two activation inputs,
Softmax, GELU as Erf), and a Conv without bias (bias correction gives it one).

The graphs are made here with onnx.helper, shaped as torch.onnx (dynamo, opset 18) writes them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_calib_images
from quench.builder import BuildOptions, build
from quench.builder.quantize import QuantConfig, quantize
from quench.builder.quantize.layers import layers, with_float_layers
from quench.builder.quantize.qdq import FLOAT_OPS, producers
from quench.model import Model

SIZE, PATCH, DIM, CLASSES = 16, 4, 8, 10
TOKENS = (SIZE // PATCH) ** 2 + 1


def _vit(seed: int = 0) -> onnx.ModelProto:
    """Patch Conv -> tokens + class token (Expand to the input's batch) + position -> one
    pre-norm transformer block (attention, GELU MLP) -> LayerNorm -> class token -> Gemm."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        return numpy_helper.from_array(values, name)

    def const(name: str, value: object, dtype: type = np.int64) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    inits = [
        w("patch_w", DIM, 3, PATCH, PATCH, scale=0.2),
        w("patch_b", DIM, scale=0.1),
        w("cls", 1, 1, DIM),
        w("pos", 1, TOKENS, DIM, scale=0.1),
        *(w(f"ln{i}_s", DIM, scale=0.1) for i in range(3)),
        *(w(f"ln{i}_b", DIM, scale=0.1) for i in range(3)),
        *(w(f"w{n}", DIM, DIM) for n in "qkvo"),
        w("w1", DIM, 2 * DIM),
        w("w2", 2 * DIM, DIM),
        w("head_w", CLASSES, DIM),
        w("head_b", CLASSES, scale=0.1),
        const("tokens_shape", [0, DIM, -1]),
        const("zero", 0),
        const("one_dim", [1, DIM]),
        const("scale", 1 / math.sqrt(DIM), np.float32),
        const("sqrt2", math.sqrt(2), np.float32),
        const("onef", 1.0, np.float32),
        const("half", 0.5, np.float32),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["images", "patch_w", "patch_b"], ["p"], strides=[PATCH, PATCH]),
        n("Reshape", ["p", "tokens_shape"], ["p2"]),
        n("Transpose", ["p2"], ["tok"], perm=[0, 2, 1]),
        n("Shape", ["images"], ["shp"]),
        n("Gather", ["shp", "zero"], ["nb"], axis=0),
        n("Unsqueeze", ["nb", "zero"], ["nb1"]),
        n("Concat", ["nb1", "one_dim"], ["cls_shape"], axis=0),
        n("Expand", ["cls", "cls_shape"], ["clsN"]),
        n("Concat", ["clsN", "tok"], ["seq"], axis=1),
        n("Add", ["seq", "pos"], ["x0"]),
        n("LayerNormalization", ["x0", "ln0_s", "ln0_b"], ["h"], axis=-1, epsilon=1e-6),
        n("MatMul", ["h", "wq"], ["q"]),
        n("MatMul", ["h", "wk"], ["k"]),
        n("MatMul", ["h", "wv"], ["v"]),
        n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["att"], name="qk"),
        n("Mul", ["att", "scale"], ["att_s"]),
        n("Softmax", ["att_s"], ["prob"], axis=-1),
        n("MatMul", ["prob", "v"], ["ctx"], name="pv"),
        n("MatMul", ["ctx", "wo"], ["o"]),
        n("Add", ["x0", "o"], ["x1"]),
        n("LayerNormalization", ["x1", "ln1_s", "ln1_b"], ["h1"], axis=-1, epsilon=1e-6),
        n("MatMul", ["h1", "w1"], ["f1"]),
        n("Div", ["f1", "sqrt2"], ["g0"]),
        n("Erf", ["g0"], ["g1"]),
        n("Add", ["g1", "onef"], ["g2"]),
        n("Mul", ["f1", "g2"], ["g3"]),
        n("Mul", ["g3", "half"], ["gelu"]),
        n("MatMul", ["gelu", "w2"], ["f2"]),
        n("Add", ["x1", "f2"], ["x2"]),
        n("LayerNormalization", ["x2", "ln2_s", "ln2_b"], ["h2"], axis=-1, epsilon=1e-6),
        n("Gather", ["h2", "zero"], ["first"], axis=1),
        n("Gemm", ["first", "head_w", "head_b"], ["logits"], transB=1),
    ]
    for i, node in enumerate(nodes):
        node.name = node.name or f"{node.op_type.lower()}_{i}"
    graph = helper.make_graph(
        nodes,
        "vit",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, SIZE, SIZE), dtype=np.float32)
    return x + rng.standard_normal((n, 3, 1, 1), dtype=np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)))


@pytest.fixture(scope="module")
def vit() -> onnx.ModelProto:
    return _vit()


@pytest.fixture(scope="module")
def vit_int8(vit: onnx.ModelProto):
    return quantize(vit, "images", _images(32, seed=1), QuantConfig())


def test_every_matmul_is_int8_behind_a_shape_of_the_input(vit: onnx.ModelProto, vit_int8) -> None:
    # the class token's Expand reads Shape(images): that path carries no pixel, so only the
    # patch Conv (the layer reading the input) stays float, not the whole residual stream
    # float: the patch Conv, the class-token Concat, the residual Adds feeding a LayerNorm and
    # GELU's element-wise nodes; not the whole residual stream behind the Shape
    residual = ["add_9", "add_20", "add_29"]
    gelu = ["div_23", "add_25", "mul_26", "mul_27"]
    assert vit_int8.info["float_nodes"] == sorted(["conv_0", "concat_8", *residual, *gelu])
    precision = {layer.name: layer.precision for layer in layers(vit_int8.model)}
    assert precision.pop("conv_0") == "float"
    assert set(precision.values()) == {"int8"}, precision
    # the two attention MatMuls read two activations, both quantized
    prod = producers(vit_int8.model)
    for name in ("qk", "pv"):
        node = next(n for n in vit_int8.model.graph.node if n.name == name)
        assert [prod[i].op_type for i in node.input] == ["DequantizeLinear"] * 2


def test_other_elementwise_ops_stay_int8(vit_int8) -> None:
    # what ONNX Runtime quantizes by default (Add, Mul, Concat...) still is, outside the
    # transformer's float patterns: the attention's scaling Mul reads quantized data
    prod = producers(vit_int8.model)
    scale = next(n for n in vit_int8.model.graph.node if n.name == "mul_16")
    assert prod[scale.input[0]].op_type == "DequantizeLinear"


def test_layernorm_softmax_and_gelu_stay_float(vit_int8) -> None:
    model = vit_int8.model
    prod = producers(model)
    kept = [n for n in model.graph.node if n.op_type in FLOAT_OPS]
    assert {n.op_type for n in kept} == {"LayerNormalization", "Softmax", "Erf"}
    for node in kept:
        for name in node.input:
            assert name not in prod or prod[name].op_type != "DequantizeLinear", node.name
    # no scale or zero point is left behind by the dropped pairs
    read = {i for n in model.graph.node for i in n.input}
    assert all(t.name in read for t in model.graph.initializer)


def test_int8_attention_close_to_fp32_on_both_engines(vit: onnx.ModelProto, vit_int8) -> None:
    x = _images(16, seed=2)
    ref = _run(vit, x)
    assert _sqnr(ref, _run(vit_int8.model, x)) > 20
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        # seen 2026-12-04: OpenVINO 2026.4 segfaults running this block, fp32 or INT8, with its
        # kernels capped to AVX2 on an AVX-512 CPU (the ops one by one run); untested on a
        # real AVX2-only CPU
        pytest.skip("OpenVINO crashes on this ViT block with ONEDNN_MAX_CPU_ISA set")
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    graph = core.read_model(vit_int8.model.SerializeToString(), b"")
    compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert _sqnr(ref, compiled(x)[0]) > 20


def test_attention_block_builds_and_infers(tmp_path: Path, vit: onnx.ModelProto) -> None:
    src = tmp_path / "vit.onnx"
    onnx.save(vit, src)
    (tmp_path / "calib").mkdir()
    calib = make_calib_images(tmp_path / "calib", 20, seed=3)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class-{i}\n" for i in range(CLASSES)))
    common = dict(preset="imagenet", resize=18, crop=SIZE, engine="onnxruntime", labels=str(labels))
    x = _images(4, seed=4)
    for mode in ("force_float32", "qint8_mixed_float32"):
        out = tmp_path / f"{mode}.quench"
        opts = BuildOptions(precision=mode, calib_images=str(calib), calib_count=20, **common)
        opts.min_top1_agreement = 0.0  # random weights: the agreement is not what is tested
        build(src, out, opts)
        with Model.load(out) as m:
            got = m.predict(x)
        assert got.shape == (4, CLASSES)
        assert _sqnr(_run(vit, x), got) > (60 if mode == "force_float32" else 15)


def _conv_without_bias() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "cw"),
        numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.3, "cw2"),
        numpy_helper.from_array(rng.standard_normal((CLASSES, 8)).astype(np.float32), "fw"),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["images", "cw"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        n("Relu", ["c"], ["r"], name="relu"),
        n("Conv", ["r", "cw2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),  # no bias
        n("Relu", ["c2"], ["r2"], name="relu2"),
        n("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        n("Flatten", ["g"], ["f"], name="flat"),
        n("Gemm", ["f", "fw"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "nobias",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_float_layer_of_a_bias_corrected_conv_without_bias() -> None:
    model = _conv_without_bias()
    res = quantize(model, "images", _images(16, seed=1), QuantConfig(bias_correction=True))
    conv2 = next(n for n in res.model.graph.node if n.name == "conv2")
    assert len(conv2.input) == 3 and res.info["bias_corrected"] >= 1  # it was given a bias
    mixed = with_float_layers(res.model, res.float_model, ["conv2"])
    conv2 = next(n for n in mixed.graph.node if n.name == "conv2")
    assert list(conv2.input) == ["r", "cw2__float"]  # float input and weight, no bias
    x = _images(8, seed=2)
    ref = _run(model, x)
    assert _sqnr(ref, _run(mixed, x)) >= _sqnr(ref, _run(res.model, x)) - 1.0


def test_a_constant_shared_with_a_quantized_node_reaches_layernorm_in_float() -> None:
    # exporters merge equal constants: here one zero vector is every LayerNorm's bias and the
    # bias of a MatMul's Add (quantized); the LayerNorms must still read it in float
    model = _vit()
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.zeros(DIM, np.float32), "zero_b"))
    for node in g.node:
        if node.op_type == "LayerNormalization":
            node.input[2] = "zero_b"
    k = next(i for i, n in enumerate(g.node) if n.name == "matmul_19")
    g.node[k].output[0] = "o_pre"
    g.node.insert(k + 1, helper.make_node("Add", ["o_pre", "zero_b"], ["o"], name="bias_add"))
    onnx.checker.check_model(model)
    res = quantize(model, "images", _images(32, seed=1), QuantConfig())
    prod = producers(res.model)
    add = next(n for n in res.model.graph.node if n.name == "bias_add")
    assert prod[add.input[1]].op_type == "DequantizeLinear"  # the shared constant, as int8
    inits = {t.name: t for t in res.model.graph.initializer}
    for node in res.model.graph.node:
        if node.op_type == "LayerNormalization":
            assert node.input[2] in inits, node.name
            assert not numpy_helper.to_array(inits[node.input[2]]).any()
    x = _images(8, seed=2)
    assert _sqnr(_run(model, x), _run(res.model, x)) > 20
