"""The ONNX -> torch translation (backend/torch) against ONNX Runtime on the CPU: whole models
(the ResNet-50 replica at opset 7, an efficientnet-lite0-like opset-13 graph) and op by op."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")

from quench.backend.onnxruntime.session import session  # noqa: E402
from quench.backend.torch.runner import TorchRunner, bucket_of  # noqa: E402
from quench.backend.torch.translate import translate  # noqa: E402
from quench.canonical import canonical  # noqa: E402
from quench.errors import ModelError  # noqa: E402

LITE0 = Path(__file__).parents[2] / "shared" / "models" / "efficientnet-lite0.onnx"


def ort_run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model, optimization="disable").run(None, feed)


def torch_run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    module = translate(model).train(False)
    with torch.inference_mode():
        outs = module(*(torch.from_numpy(feed[n]) for n in module.input_names))
    return [o.numpy() for o in outs]


def max_diff(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[float, float]:
    """The largest absolute difference from ONNX Runtime over all outputs, and ORT's largest
    absolute output value."""
    want, got = ort_run(model, feed), torch_run(model, feed)
    diffs, scale = [], 0.0
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape and w.dtype == g.dtype
        diffs.append(float(np.max(np.abs(w.astype(np.float64) - g))) if w.size else 0.0)
        scale = max(scale, float(np.max(np.abs(w))) if w.size else 0.0)
    return max(diffs), scale


def test_resnet50_replica_opset7_matches_onnxruntime() -> None:
    from quench.zoo.synth import synth_resnet50_v1

    model, _ = canonical(synth_resnet50_v1(seed=0))
    assert model.opset_import[0].version == 7
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    diff, scale = max_diff(model, {"data": x})
    assert diff < 1e-4 * max(1.0, scale), (diff, scale)


def lite0_like(batch: int | str = "N") -> onnx.ModelProto:
    """The efficientnet-lite0 export's forms at opset 13: TF-style static padding (pads made
    by ConstantOfShape / Concat / Slice with a negative step / Cast, then Pad), Conv with
    BatchNormalization, ReLU6 as Clip with min/max inputs, a depthwise conv, a residual Add,
    GlobalAveragePool, a Shape / Gather / Unsqueeze / Concat / Reshape head and Gemm."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype("f4"), name)

    def c(name: str, values: list, dtype: str = "i8") -> onnx.TensorProto:
        return numpy_helper.from_array(np.array(values, dtype), name)

    inits = [
        w("stem_w", 8, 3, 3, 3),
        w("dw_w", 8, 1, 3, 3),
        w("pw_w", 8, 8, 1, 1),
        *(
            numpy_helper.from_array(v.astype("f4"), n)
            for n, v in {
                "bn_s": rng.uniform(0.5, 1.5, 8),
                "bn_b": rng.normal(0, 0.1, 8),
                "bn_m": rng.normal(0, 0.1, 8),
                "bn_v": rng.uniform(0.5, 2, 8),
            }.items()
        ),
        c("lo", 0.0, "f4"),
        c("hi", 6.0, "f4"),
        c("pad_half", [0, 1, 0, 1]),  # (begin, end) pairs, last axis first
        c("n4", [4]),
        c("minus1", [-1]),
        c("big_neg", [-(2**62)]),
        c("big", [2**62]),
        c("zero", [0]),
        c("shape2", [-1, 2]),
        c("idx0", 0),
        c("ax0", [0]),
        c("minus1_tail", [-1]),
        w("fc_w", 5, 8),
        w("fc_b", 5),
    ]
    n = helper.make_node
    nodes = [
        n("ConstantOfShape", ["n4"], ["zeros4"], value=helper.make_tensor("v", 7, [1], [0])),
        n("Concat", ["pad_half", "zeros4"], ["pads12"], axis=0),
        n("Reshape", ["pads12", "shape2"], ["pairs"]),
        n("Slice", ["pairs", "minus1", "big_neg", "zero", "minus1"], ["rev"]),
        n("Transpose", ["rev"], ["revt"], perm=[1, 0]),
        n("Reshape", ["revt", "minus1"], ["flat"]),
        n("Cast", ["flat"], ["pads"], to=7),
        n("Slice", ["pads", "zero", "big"], ["pads8"]),
        n("Pad", ["x", "pads8"], ["xp"], mode="constant"),
        n("Conv", ["xp", "stem_w"], ["s"], strides=[2, 2]),
        n("BatchNormalization", ["s", "bn_s", "bn_b", "bn_m", "bn_v"], ["sb"]),
        n("Clip", ["sb", "lo", "hi"], ["r6"]),
        n("Conv", ["r6", "dw_w"], ["dw"], group=8, pads=[1, 1, 1, 1]),
        n("Clip", ["dw", "lo", "hi"], ["dw6"]),
        n("Conv", ["dw6", "pw_w"], ["pw"]),
        n("Add", ["pw", "r6"], ["res"]),
        n("GlobalAveragePool", ["res"], ["g"]),
        n("Shape", ["g"], ["gs"]),
        n("Gather", ["gs", "idx0"], ["b"], axis=0),
        n("Unsqueeze", ["b", "ax0"], ["b1"]),
        n("Concat", ["b1", "minus1_tail"], ["head_shape"], axis=0),
        n("Reshape", ["g", "head_shape"], ["f"]),
        n("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "lite0_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 17, 17])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_efficientnet_lite0_like_opset13_matches_onnxruntime() -> None:
    x = np.random.default_rng(2).standard_normal((3, 3, 17, 17)).astype(np.float32)
    diff, scale = max_diff(lite0_like(), {"x": x})
    assert scale > 0.1 and diff < 1e-5 * max(1.0, scale), (diff, scale)


@pytest.mark.skipif(not LITE0.exists(), reason=f"{LITE0} is not here (optional real model)")
def test_real_efficientnet_lite0_matches_onnxruntime() -> None:
    model = onnx.load(str(LITE0))
    name = model.graph.input[0].name
    x = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    diff, scale = max_diff(model, {name: x})
    assert diff < 1e-4 * max(1.0, scale), (diff, scale)


def one_op(op: str, shapes: list[list[int]], opset: int = 13, consts: dict | None = None,
           **attrs: object) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:  # fmt: skip
    """A graph of one ``op`` node on random float inputs (and constant inputs ``consts``,
    after them, by name: ``None`` for a left-out optional input)."""
    rng = np.random.default_rng(4)
    names = [f"in{i}" for i in range(len(shapes))]
    feed = {
        n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes, strict=True)
    }
    inits, inputs = [], list(names)
    for name, value in (consts or {}).items():
        if value is None:
            inputs.append("")
        else:
            inits.append(numpy_helper.from_array(np.asarray(value), name))
            inputs.append(name)
    node = helper.make_node(op, inputs, ["out"], **attrs)
    graph = helper.make_graph(
        [node],
        op,
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
            for n, s in zip(names, shapes, strict=True)
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), feed


X = [2, 4, 9, 9]
I8 = np.int64
CASES = {
    "conv same_upper stride 2": ("Conv", [X, [6, 4, 3, 3], [6]], 13, None,
                                 {"auto_pad": "SAME_UPPER", "strides": [2, 2],
                                  "kernel_shape": [3, 3]}),
    "conv asymmetric pads dilation": ("Conv", [X, [6, 2, 3, 3]], 13, None,
                                      {"pads": [0, 1, 2, 1], "dilations": [2, 1], "group": 2,
                                       "kernel_shape": [3, 3]}),
    "maxpool asymmetric ceil": ("MaxPool", [X], 13, None,
                                {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1],
                                 "ceil_mode": 1}),
    "maxpool 1-D": ("MaxPool", [[2, 3, 10]], 13, None, {"kernel_shape": [3], "strides": [2]}),
    "averagepool pads counted": ("AveragePool", [X], 13, None,
                                 {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                  "count_include_pad": 1}),
    "averagepool pads not counted": ("AveragePool", [X], 13, None,
                                     {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                      "strides": [2, 2]}),
    "globalmaxpool": ("GlobalMaxPool", [X], 13, None, {}),
    "lrn": ("LRN", [X], 13, None, {"size": 3, "alpha": 1e-3, "beta": 0.75, "bias": 2.0}),
    "gemm transA alpha beta": ("Gemm", [[5, 3], [5, 4], [4]], 13, None,
                               {"transA": 1, "alpha": 0.5, "beta": 2.0}),
    "matmul batched": ("MatMul", [[2, 3, 4], [4, 5]], 13, None, {}),
    "softmax opset 11 axis 1 of 3-D": ("Softmax", [[2, 3, 4]], 11, None, {"axis": 1}),
    "softmax opset 13": ("Softmax", [[2, 3, 4]], 13, None, {"axis": 1}),
    "logsoftmax": ("LogSoftmax", [[2, 7]], 13, None, {}),
    "clip opset 7 attrs": ("Clip", [X], 7, None, {"min": -0.5, "max": 0.5}),
    "clip max only": ("Clip", [X], 13, {"lo": None, "hi": np.float32(0.3)}, {}),
    "hardswish": ("HardSwish", [X], 14, None, {}),
    "hardsigmoid": ("HardSigmoid", [X], 13, None, {"alpha": 0.3, "beta": 0.4}),
    "leakyrelu": ("LeakyRelu", [X], 13, None, {"alpha": 0.2}),
    "erf": ("Erf", [X], 13, None, {}),
    "sigmoid": ("Sigmoid", [X], 13, None, {}),
    "broadcast div": ("Div", [X, [4, 1, 1]], 13, None, {}),
    "sum of three": ("Sum", [X, X, [9]], 13, None, {}),
    "flatten axis 2": ("Flatten", [X], 13, None, {"axis": 2}),
    "transpose default": ("Transpose", [X], 13, None, {}),
    "reshape zero and -1": ("Reshape", [X], 13, {"s": np.array([0, -1, 3], I8)}, {}),
    "slice steps and negatives": ("Slice", [X], 13, {"st": np.array([1, -2], I8),
                                                     "en": np.array([9, 0], I8),
                                                     "ax": np.array([2, 3], I8),
                                                     "sp": np.array([3, -2], I8)}, {}),
    "slice opset 7 attrs": ("Slice", [X], 7, None, {"starts": [1], "ends": [3], "axes": [1]}),
    "squeeze opset 11": ("Squeeze", [[2, 1, 3, 1]], 11, None, {"axes": [1, 3]}),
    "unsqueeze opset 13": ("Unsqueeze", [[2, 3]], 13, {"a": np.array([0, -1], I8)}, {}),
    "pad reflect": ("Pad", [X], 13, {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], I8)},
                    {"mode": "reflect"}),
    "pad edge opset 7": ("Pad", [X], 7, None, {"pads": [0, 1, 0, 1, 0, 1, 0, 1], "mode": "edge"}),
    "reducemean opset 13": ("ReduceMean", [X], 13, None, {"axes": [2, 3], "keepdims": 0}),
    "reducesum axes input": ("ReduceSum", [X], 13, {"a": np.array([1], I8)}, {}),
    "batchnorm opset 7": ("BatchNormalization", [X, [4], [4], [4]], 7,
                          {"var": np.full(4, 0.7, np.float32)}, {"epsilon": 1e-3}),
    "concat negative axis": ("Concat", [X, X], 13, None, {"axis": -3}),
    "gather indices 2-D": ("Gather", [X], 13, {"i": np.array([[0, -1], [2, 1]], I8)},
                           {"axis": 1}),
    "dropout": ("Dropout", [X], 13, None, {}),
    "identity": ("Identity", [X], 13, None, {}),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_op_matches_onnxruntime(case: str) -> None:
    op, shapes, opset, consts, attrs = CASES[case]
    model, feed = one_op(op, shapes, opset, consts, **attrs)
    diff, _ = max_diff(model, feed)
    assert diff < 2e-5, diff


def test_integer_shape_arithmetic_matches_onnxruntime() -> None:
    """Integer Div truncates as ONNX says, and Shape's start/end (opset 15)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1),
        helper.make_node("Div", ["s", "two"], ["half"]),
        helper.make_node("Neg", ["half"], ["neg"]),
        helper.make_node("Div", ["neg", "two"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "ints",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 5])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2])],
        [numpy_helper.from_array(np.array(2, np.int64), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    feed = {"x": np.zeros((2, 7, 5), np.float32)}
    got, want = torch_run(model, feed)[0], ort_run(model, feed)[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("op", "attrs", "opset", "domain", "words"),
    [
        ("NonZero", {}, 13, "", "no translation for this operator"),
        ("Relu", {}, 13, "com.microsoft", "operator domain 'com.microsoft'"),
        ("LRN", {"size": 4}, 13, "", "window size 4 is even"),
        ("BatchNormalization", {"spatial": 0}, 7, "", "spatial=0"),
        ("AveragePool", {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1]}, 13, "", "asymmetric"),
    ],
)
def test_untranslatable_node_is_refused_in_one_line(
    op: str, attrs: dict, opset: int, domain: str, words: str
) -> None:
    inputs = ["x"] + (["s", "b", "m", "v"] if op == "BatchNormalization" else [])
    node = helper.make_node(op, inputs, ["y"], name="the_node", domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        "bad",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    with pytest.raises(ModelError) as err:
        translate(model, "m.onnx")
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"m.onnx: {op} node 'the_node'") and words in text


def test_old_opset_and_read_training_output_are_refused() -> None:
    model, _ = one_op("Relu", [[1, 2]], opset=6)
    with pytest.raises(ModelError, match="opset 6 is older than 7"):
        translate(model)
    model, _ = one_op("Dropout", [[1, 2]])
    model.graph.node[0].output.append("mask")
    model.graph.output.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, None))
    with pytest.raises(ModelError, match="training output 'mask' is read"):
        translate(model)


def test_cpu_runner_pads_to_the_bucket_and_trims() -> None:
    model = lite0_like()
    x = np.random.default_rng(5).standard_normal((3, 3, 17, 17)).astype(np.float32)
    with TorchRunner(model.SerializeToString(), device="cpu", compile=False) as run:
        assert [m.name for m in run.inputs()] == ["x"] and run.outputs()[0].shape == ("N", 5)
        got = run.infer({"x": x})["y"]
    assert bucket_of(3) == 4 and bucket_of(300) == 300
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], atol=1e-5)


def test_cpu_runner_in_bfloat16_stays_close() -> None:
    model = lite0_like()
    x = np.random.default_rng(6).standard_normal((2, 3, 17, 17)).astype(np.float32)
    with TorchRunner(model.SerializeToString(), "cpu", "bfloat16", compile=False) as run:
        assert run.module.c0.dtype in (torch.bfloat16, torch.int64)
        got = run.infer({"x": x})["y"]
    want = ort_run(model, {"x": x})[0]
    assert got.dtype == np.float32
    assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))


def test_batch_specialised_translation_compiles_as_one_graph() -> None:
    """At one input shape, the Shape nodes' values become constants: no runtime Shape is left,
    so torch.compile traces the whole model as one graph (what the CUDA runner compiles per
    bucket), sharing the weights of the general module."""
    model = lite0_like()
    x = np.random.default_rng(7).standard_normal((4, 3, 17, 17)).astype(np.float32)
    base = translate(model)
    assert base.runtime_shapes
    shapes = base.shape_values(torch.from_numpy(x))
    assert [v.tolist() for v in shapes.values()] == [[4, 8, 1, 1]]
    fixed = translate(model, shapes=shapes).train(False)
    assert not fixed.runtime_shapes
    fixed.share_constants(base)
    weights = {n for n in base._constants if n.endswith("_w")}
    assert weights and all(
        getattr(fixed, fixed._constants[n]) is getattr(base, base._constants[n]) for n in weights
    )
    compiled = torch.compile(fixed, backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        got = compiled(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, ort_run(model, {"x": x})[0], atol=1e-5)
