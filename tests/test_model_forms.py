"""The graph forms users bring (ONNX model zoo, old exporters): fixed batches, Reshapes that
hard-code the batch, [N, C, 1, 1] and softmax heads, weights listed among the inputs (IR 3),
opset 7, LRN, Dropout, grouped and depthwise convs, Concat blocks and channel shuffle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import TINY_BUILD, make_calib_images
from quench.backend.failures import one_line
from quench.batch_form import probe
from quench.builder import build
from quench.errors import ModelError
from quench.model import Model

S, C = 16, 10  # image size, classes
BUILD = {**TINY_BUILD, "resize": 18, "crop": S}


class Graph:
    """A small classifier graph written node by node (random weights, fixed seed)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.3) -> str:
        a = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(a, name))
        return name

    def const(self, name: str, value: list[int]) -> str:
        self.inits.append(numpy_helper.from_array(np.array(value, np.int64), name))
        return name

    def node(self, op: str, inputs: list[str], out: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n_{out}", **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, name: str, group: int = 1, k: int = 3) -> str:
        w = self.weight(f"{name}_w", (cout, cin // group, k, k))
        b = self.weight(f"{name}_b", (cout,), 0.1)
        pad = k // 2
        y = self.node("Conv", [x, w, b], name, pads=[pad] * 4, group=group)
        return self.node("Relu", [y], f"{name}_relu")

    def fc(self, x: str, cin: int) -> str:
        w, b = self.weight("fc_w", (C, cin)), self.weight("fc_b", (C,), 0.1)
        return self.node("Gemm", [x, w, b], "fc", transB=1)

    def save(
        self,
        path: Path,
        out: str,
        out_shape: list[int | str],
        batch: int | str = 1,
        opset: int = 13,
        ir: int = 8,
        inits_as_inputs: bool = False,
    ) -> Path:
        self.nodes[-1].output[0] = "scores"
        for n in self.nodes:  # the last node's output was ``out``
            n.input[:] = ["scores" if i == out else i for i in n.input]
        inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, S, S])]
        if inits_as_inputs:
            inputs += [
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits
            ]
        graph = helper.make_graph(
            self.nodes,
            "forms",
            inputs,
            [helper.make_tensor_value_info("scores", TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = ir
        onnx.checker.check_model(model)
        onnx.save(model, path)
        return path


def _stem(g: Graph, ch: int = 8) -> str:
    return g.conv("data", 3, ch, "c1")


def _pool_reshape(g: Graph, x: str, ch: int, shape: list[int]) -> str:
    p = g.node("GlobalAveragePool", [x], "gap")
    return g.node("Reshape", [p, g.const("flat_shape", shape)], "flat")


def caffe2_style(path: Path, batch: int | str = 1) -> Path:
    """ResNet-50 (Caffe2) / GoogLeNet's tail: GlobalAveragePool -> Reshape [1, C] -> Gemm ->
    Softmax."""
    g = Graph()
    x = _stem(g)
    x = _pool_reshape(g, x, 8, [1, 8])
    y = g.node("Softmax", [g.fc(x, 8)], "prob", axis=1)
    return g.save(path, y, [batch, C], batch=batch)


def shufflenet_style(path: Path) -> Path:
    """A grouped conv, a channel shuffle (Reshape [1, g, c/g, h, w] -> Transpose -> Reshape),
    a depthwise conv, a Concat block and Reshape [1, -1]."""
    g = Graph(1)
    x = _stem(g, 8)
    x = g.conv(x, 8, 8, "gconv", group=2)
    r = g.node("Reshape", [x, g.const("shuf1", [1, 2, 4, S, S])], "shuf_r1")
    t = g.node("Transpose", [r], "shuf_t", perm=[0, 2, 1, 3, 4])
    x = g.node("Reshape", [t, g.const("shuf2", [1, 8, S, S])], "shuf_r2")
    d = g.conv(x, 8, 8, "dw", group=8)
    x = g.node("Concat", [x, d], "cat", axis=1)
    x = _pool_reshape(g, x, 16, [1, -1])
    return g.save(path, g.fc(x, 16), [1, C])


def class_token_style(path: Path) -> Path:
    """A constant [1, 4] "token" concatenated to the pooled features: only batch 1 runs, and
    no Reshape rewrite can change that."""
    g = Graph(2)
    x = _stem(g, 8)
    p = g.node("GlobalAveragePool", [x], "gap")
    f = g.node("Flatten", [p], "flat", axis=1)
    tok = g.weight("token", (1, 4))
    x = g.node("Concat", [f, tok], "with_token", axis=1)
    return g.save(path, g.fc(x, 12), [1, C])


def squeezenet_style(
    path: Path, opset: int = 13, ir: int = 8, inits_as_inputs: bool = False
) -> Path:
    """SqueezeNet / DenseNet's head: a 1x1 conv to the classes, pooled: [N, C, 1, 1]; LRN and
    Dropout on the way; Softmax last (opset 7 with weights among the inputs, like the zoo)."""
    g = Graph(3)
    x = _stem(g, 8)
    x = g.node("LRN", [x], "lrn", size=3, alpha=1e-4, beta=0.75, bias=1.0)
    x = g.node("Dropout", [x], "drop")
    w, b = g.weight("head_w", (C, 8, 1, 1)), g.weight("head_b", (C,), 0.1)
    x = g.node("Conv", [x, w, b], "head")
    x = g.node("GlobalAveragePool", [x], "pool")
    y = g.node("Softmax", [x], "prob", axis=1)
    return g.save(path, y, [1, C, 1, 1], opset=opset, ir=ir, inits_as_inputs=inits_as_inputs)


def _per_image(model: Path, x: np.ndarray) -> np.ndarray:
    """The source model on each image alone (batch 1, as exported)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"data": x[i : i + 1]})[0] for i in range(len(x))])


def _calib(tmp_path: Path, seed: int) -> Path:
    (tmp_path / "calib").mkdir()
    return make_calib_images(tmp_path / "calib", 12, seed=seed)


def _int8(src: Path, out: Path, labels: Path, calib: Path, engine: str = "onnxruntime") -> Model:
    """An INT8 build (fp32 elsewhere) of ``src`` calibrated on ``calib``, with a loose gate."""
    return build(
        src,
        out,
        labels=str(labels),
        precision="qint8_mixed_float32",
        calib_images=str(calib),
        min_top1_agreement=0.5,
        **{**BUILD, "engine": engine},
    )


def _x(n: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, S, S)).astype(np.float32)


# -- batch probing ---------------------------------------------------------------------------


def test_probe_finds_the_batch_a_reshape_hard_codes(tmp_path: Path) -> None:
    src = onnx.load(caffe2_style(tmp_path / "m.onnx", batch="N"))
    form = probe(src, (3, S, S), "m.onnx")
    assert form.declared is None and not form.native and form.mutable is not None
    assert "Reshape node 'n_flat'" in form.why and "cannot be reshaped" in form.why
    assert [r.kind for r in form.rewrites] == ["reshape_batch"]


def test_probe_refuses_a_graph_that_no_rewrite_makes_mutable(tmp_path: Path) -> None:
    form = probe(onnx.load(class_token_style(tmp_path / "m.onnx")), (3, S, S), "m.onnx")
    assert form.declared == 1 and form.mutable is None and form.only == 1
    assert "Concat node 'n_with_token'" in form.why


def test_fixed_batch_model_builds_at_its_batch_and_says_so(tmp_path: Path, tiny_labels) -> None:
    src = caffe2_style(tmp_path / "caffe2.onnx")
    lines: list[str] = []
    m = build(src, tmp_path / "m.quench", labels=str(tiny_labels), log=lines.append, **BUILD)
    assert m.fixed_batch == 1
    assert any(
        line.startswith("batch: fixed at 1: the input declares batch 1;")
        and "--dynamic-batch" in line
        for line in lines
    ), lines
    assert m.spec.output_kind == "probabilities"  # the graph ends in a Softmax
    x = _x(5)
    np.testing.assert_allclose(m.predict(x), _per_image(src, x), rtol=1e-4, atol=1e-6)
    src_manifest = m.manifest["source"]
    assert src_manifest["batch"]["declared"] == 1 and src_manifest["batch"]["mutable"]


def test_dynamic_batch_rewrites_the_reshape_and_records_it(tmp_path: Path, tiny_labels) -> None:
    src = shufflenet_style(tmp_path / "shuffle.onnx")
    m = build(src, tmp_path / "m.quench", labels=str(tiny_labels), dynamic_batch=True, **BUILD)
    assert m.fixed_batch is None
    kinds = [r["kind"] for r in m.manifest["source"]["rewrites"]]
    assert kinds == ["reshape_batch"] * 3  # the shuffle's two Reshapes and the flatten
    x = _x(6)
    np.testing.assert_allclose(m.predict(x, batch_size=6), _per_image(src, x), rtol=1e-4, atol=1e-5)
    with Model.load(tmp_path / "m.quench") as again:  # the artifact checks itself at load
        assert again.fixed_batch is None


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_graph_that_runs_only_at_batch_1_builds_int8_and_classifies(
    tmp_path: Path, tiny_labels: Path, engine: str
) -> None:
    src = class_token_style(tmp_path / "token.onnx")
    calib = _calib(tmp_path, 3)
    m = _int8(src, tmp_path / "m.quench", tiny_labels, calib, engine=engine)
    assert m.fixed_batch == 1
    preds = m.classify(sorted(calib.iterdir()), topk=3)
    assert len(preds) == 12 and all(p.ok for p in preds)


def test_refusals_name_the_node_and_what_to_do(tmp_path: Path, tiny_labels: Path) -> None:
    src = class_token_style(tmp_path / "token.onnx")
    with pytest.raises(ModelError) as err:
        build(src, tmp_path / "a.quench", labels=str(tiny_labels), dynamic_batch=True, **BUILD)
    msg = str(err.value)
    assert "\n" not in msg and "cannot make the batch mutable" in msg
    assert "Concat node 'n_with_token'" in msg and "--batch 1" in msg
    with pytest.raises(ModelError, match=r"runs only at batch 1 .*build with --batch 1$"):
        build(src, tmp_path / "b.quench", labels=str(tiny_labels), batch=4, **BUILD)
    assert not (tmp_path / "a.quench").exists() and not (tmp_path / "b.quench").exists()


def test_a_model_that_fails_at_its_own_batch_is_one_line(tmp_path: Path, tiny_labels) -> None:
    g = Graph()
    x = _stem(g)
    x = _pool_reshape(g, x, 8, [1, 9])  # 8 values cannot become 9
    src = g.save(tmp_path / "broken.onnx", g.fc(x, 9), [1, C])
    with pytest.raises(ModelError) as err:
        build(src, tmp_path / "m.quench", labels=str(tiny_labels), **BUILD)
    msg = str(err.value)
    assert msg.startswith(f"{src}: the model does not run at batch 1: Reshape node 'n_flat': ")
    assert "\n" not in msg and "onnxruntime_src" not in msg


def test_cli_build_of_a_broken_model_prints_one_line(tmp_path: Path, tiny_labels: Path) -> None:
    from test_cli import invoke

    g = Graph()
    x = _pool_reshape(g, _stem(g), 8, [1, 9])
    src = g.save(tmp_path / "broken.onnx", g.fc(x, 9), [1, C])
    flags = ["--preset", "imagenet", "--resize", "18", "--crop", str(S), "--engine", "onnxruntime"]
    res = invoke("build", src, "-o", tmp_path / "m.quench", "--labels", tiny_labels, *flags)
    assert res.exit_code == 1
    assert "Traceback" not in res.stderr
    assert [line for line in res.stderr.splitlines() if line.startswith("error:")] == [
        line for line in res.stderr.splitlines() if "Reshape node 'n_flat'" in line
    ]


def test_one_line_keeps_the_cause_and_drops_the_source_path() -> None:
    raw = (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape "
        "node. Name:'n173' Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/tensor"
        "/reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper(const onnxruntime::"
        "TensorShape&, onnxruntime::TensorShapeVector&, bool) input_shape_size == "
        "requested_shape_size was false. The input tensor cannot be reshaped to the requested "
        "shape. Input shape:{2,2048,1,1}, requested shape:{1,2048}\n"
    )
    assert one_line(RuntimeError(raw)) == (
        "Reshape node 'n173': The input tensor cannot be reshaped to the requested shape. "
        "Input shape:{2,2048,1,1}, requested shape:{1,2048}"
    )


# -- heads and old forms ---------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_nc11_softmax_head_opset7_ir3(tmp_path: Path, tiny_labels: Path, engine: str) -> None:
    src = squeezenet_style(tmp_path / "sq.onnx", opset=7, ir=3, inits_as_inputs=True)
    m = build(src, tmp_path / "m.quench", labels=str(tiny_labels), **{**BUILD, "engine": engine})
    kinds = [r["kind"] for r in m.manifest["source"]["rewrites"]]
    assert kinds == ["initializers_out", "squeeze_head"]
    assert m.manifest["io"]["output"]["shape"] == [1, C]
    assert m.spec.output_kind == "probabilities"
    x = _x(3)
    got = m.predict(x)
    np.testing.assert_allclose(got, _per_image(src, x).reshape(3, C), rtol=1e-4, atol=1e-6)
    p = m.classify([np.zeros((S, S, 3), np.uint8).tobytes()], topk=2)  # not an image: an error
    assert not p[0].ok


def test_int8_keeps_the_final_softmax_in_float(tmp_path: Path, tiny_labels: Path) -> None:
    src = squeezenet_style(tmp_path / "sq.onnx")
    m = _int8(src, tmp_path / "m.quench", tiny_labels, _calib(tmp_path, 4))
    qdq = onnx.load_from_string(m.artifact.payloads["model.onnx"])
    producers = {o: n for n in qdq.graph.node for o in n.output}
    soft = next(n for n in qdq.graph.node if n.op_type == "Softmax")
    feeding = producers[soft.input[0]]
    assert feeding.op_type not in ("DequantizeLinear", "QuantizeLinear")
    assert not any(
        n.op_type == "QuantizeLinear" and n.input[0] == soft.output[0] for n in qdq.graph.node
    )
    scores = m.predict(_x(4))
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-5)
    assert len(np.unique(scores)) > 4 * C // 2  # float probabilities, not 256 levels


# -- Caffe-style preprocessing ---------------------------------------------------------------


def test_caffe_zoo_presets_take_bgr_pixels_minus_the_mean() -> None:
    from dataclasses import replace

    from quench.imaging import Normalizer
    from quench.presets import detect_preset, get_preset

    pixel = np.array([200, 100, 50], np.uint8).reshape(1, 1, 1, 3)  # R, G, B
    x = Normalizer(replace(get_preset("bvlc-googlenet").data, resize=1, crop=1)).batch(pixel)
    np.testing.assert_allclose(x.reshape(3), [50 - 104, 100 - 117, 200 - 123])  # B, G, R
    d = Normalizer(replace(get_preset("densenet121-caffe2").data, resize=1, crop=1)).batch(pixel)
    np.testing.assert_allclose(
        d.reshape(3), np.array([50 - 103.94, 100 - 116.78, 200 - 123.68]) / 58.8, rtol=1e-5
    )
    # unique tensor names are detected; the zoo's shared data_0 -> prob_1 is not guessed
    assert detect_preset("data_0", "softmaxout_1").name == "squeezenet1.0"
    assert detect_preset("data_0", "prob_1") is None


def test_perf_of_a_batch_1_onnx_file_times_batch_1(tmp_path: Path) -> None:
    import json

    from test_cli import invoke

    src = caffe2_style(tmp_path / "caffe2.onnx")
    out = tmp_path / "p.json"
    res = invoke("perf", src, "--iterations", 2, "--warmup", 0, "--json", out)
    assert res.exit_code == 0, res.output
    assert [r["batch"] for r in json.loads(out.read_text())["results"]] == [1]
    res = invoke("perf", src, "--batch", "4", "--iterations", 2, "--warmup", 0)
    assert res.exit_code == 1 and "Traceback" not in res.output  # plain ORT: batch 1 only
    assert len(res.stderr.strip().splitlines()) == 1 and "data" in res.stderr


def test_diagnose_and_repair_on_a_graph_that_runs_only_at_batch_1(
    tmp_path: Path, tiny_labels: Path
) -> None:
    from quench.builder import BuildOptions
    from quench.builder.core import AccuracyGateError
    from quench.builder.diagnose import diagnose

    src = class_token_style(tmp_path / "token.onnx")
    calib = _calib(tmp_path, 6)
    opts = {
        **BUILD,
        "labels": str(tiny_labels),
        "precision": "qint8_mixed_float32",
        "calib_images": str(calib),
    }
    d = diagnose(src, BuildOptions(**opts))  # ranks every layer at the batch the graph runs
    assert set(d.ranking) >= {"n_fc"} and len(d.layers) >= 2
    # an unreachable bound: the repair ranks and searches, then refuses in one line
    with pytest.raises(AccuracyGateError) as err:
        build(src, tmp_path / "m.quench", check_images=str(calib), max_top1_drop=-100.0, **opts)
    msg = str(err.value)
    assert "\n" not in msg and "no mix of float layers meets the bound" in msg
    assert not (tmp_path / "m.quench").exists()


def test_an_engine_failure_late_in_a_build_is_one_line_with_what_to_try(
    tmp_path: Path, tiny_labels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quench.builder import core
    from quench.errors import EngineError

    def fails(*args: object) -> None:
        raise EngineError("Conv node 'n_c1': could not create a primitive")

    monkeypatch.setattr(core, "_compile_and_select", fails)
    src = caffe2_style(tmp_path / "m.onnx")
    with pytest.raises(ModelError) as err:
        build(src, tmp_path / "m.quench", labels=str(tiny_labels), **{**BUILD, "engine": "auto"})
    assert str(err.value) == (
        f"{src}: Conv node 'n_c1': could not create a primitive "
        "(try --engine onnxruntime or --engine openvino or --batch 1)"
    )


def test_the_crop_and_layout_come_from_the_input_when_no_preset_says() -> None:
    from quench.presets import DataConfig, fit_to_input

    base = DataConfig()  # 256 -> 224, NCHW
    assert fit_to_input(base, ["N", 3, 224, 224]) == (base, None)
    nhwc, line = fit_to_input(base, [1, 299, 299, 3])
    assert (nhwc.layout, nhwc.crop, nhwc.resize) == ("NHWC", 299, 342)
    assert line is not None and "NHWC, crop 299, resize 342" in line
    assert fit_to_input(base, ["N", 3, "H", "W"]) == (base, None)  # nothing certain
    assert fit_to_input(base, [1, 1, 28, 28]) == (base, None)


def test_a_generic_build_fits_the_preprocessing_to_the_input(tmp_path: Path, tiny_labels) -> None:
    from conftest import make_classifier

    src = make_classifier(tmp_path / "m20.onnx", size=20, input_name="x", output_name="y")
    lines: list[str] = []
    m = build(
        src, tmp_path / "m.quench", labels=str(tiny_labels), engine="onnxruntime", log=lines.append
    )
    assert (m.data.crop, m.data.resize, m.data.layout) == (20, 23, "NCHW")
    assert any(line.startswith("preprocessing: the input is ['N', 3, 20, 20]") for line in lines)


def test_quench_run_builds_mutable_where_a_checked_form_exists(tmp_path: Path) -> None:
    from quench.batch_form import IF_POSSIBLE, policy

    rewritable = probe(onnx.load(caffe2_style(tmp_path / "a.onnx")), (3, S, S), "a.onnx")
    batch, line = policy(rewritable, None, IF_POSSIBLE, "a.onnx")
    assert batch is None and line.startswith("batch: mutable (mutable where it can be), the graph")
    assert policy(rewritable, None, None, "a.onnx")[0] == 1  # build's default: as declared
    stuck = probe(onnx.load(class_token_style(tmp_path / "b.onnx")), (3, S, S), "b.onnx")
    batch, line = policy(stuck, None, IF_POSSIBLE, "b.onnx")
    assert batch == 1 and line.startswith("batch: fixed at 1: the input declares batch 1;")
