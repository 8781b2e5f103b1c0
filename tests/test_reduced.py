"""bf16 builds with the guarantees of INT8: fidelity gate, layers kept in fp32 per node in the
IR, and the repair that chooses them."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ov = pytest.importorskip("openvino")

from conftest import NUM_CLASSES, SIZE, TINY_BUILD, make_calib_images  # noqa: E402
from quench.artifact import load as load_artifact  # noqa: E402
from quench.backend.openvino import keep_f32, loader  # noqa: E402
from quench.builder import build  # noqa: E402
from quench.builder.reduced import HALF_MIN_TOP1_AGREEMENT, min_top1_agreement  # noqa: E402
from quench.errors import QuenchError  # noqa: E402
from quench.model import Model  # noqa: E402

needs_bf16 = pytest.mark.skipif(
    "BF16" not in loader.cpu_capabilities(), reason="this CPU has no bf16 arithmetic"
)


def near_tie_classifier(path: Path) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm whose classes differ by 0.1% of
    their weights: bf16 (8-bit mantissa) cannot tell them apart, fp32 can."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal(16).astype(np.float32)
    fc = base + 1e-3 * rng.standard_normal((NUM_CLASSES, 16)).astype(np.float32)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(fc.astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(NUM_CLASSES, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "near-tie",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def near_tie(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return near_tie_classifier(tmp_path_factory.mktemp("models") / "near-tie.onnx")


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_calib_images(tmp_path_factory.mktemp("calib"), 40, seed=5)


def test_default_bound_per_precision() -> None:
    assert min_top1_agreement("force_bfloat16", None, images=True) == HALF_MIN_TOP1_AGREEMENT
    assert min_top1_agreement("force_float16", None, images=True) == HALF_MIN_TOP1_AGREEMENT
    assert min_top1_agreement("force_bfloat16", None, images=False) == 0.8  # random input
    assert min_top1_agreement("qint8_mixed_float16", None, images=True) == 0.8
    assert min_top1_agreement("force_bfloat16", 0.5, images=True) == 0.5


def test_mark_keeps_layers_and_their_fused_elementwise_readers(near_tie: Path) -> None:
    model = onnx.load(near_tie)
    xml, _ = loader.convert(model, None, False)
    assert keep_f32.marked(keep_f32.mark(xml, keep_f32.outputs_of(model, ["conv"]))) == [
        "conv",
        "relu",  # fused into the conv: marked with it
    ]
    # the Gemm became a MatMul named after its output tensor: found by that name
    assert keep_f32.marked(keep_f32.mark(xml, keep_f32.outputs_of(model, ["fc"]))) == ["logits"]
    with pytest.raises(QuenchError, match="no OpenVINO layer for nope"):
        keep_f32.mark(xml, {"nope": ["nope_out"]})


@needs_bf16
def test_bf16_build_repairs_itself_by_keeping_layers_in_fp32(
    near_tie: Path, calib: Path, tiny_labels: Path, tmp_path: Path
) -> None:
    opts = {**TINY_BUILD, "engine": "openvino"}
    out = tmp_path / "bf16.quench"
    m = build(
        near_tie, out, precision="force_bfloat16", calib_images=str(calib),
        labels=str(tiny_labels), **opts,
    )  # fmt: skip
    d = m.spec.to_dict()
    assert d["fidelity"]["min_top1_agreement"] == HALF_MIN_TOP1_AGREEMENT
    assert d["fidelity"]["passed"] and d["fidelity"]["source"] == "calibration images"
    section = d["reduced_precision"]
    assert section["float32_layers"] == ["fc"]  # the fewest: the near-tied classifier
    repair = section["repair"]
    assert repair["all_reduced"]["top1_agreement"] < HALF_MIN_TOP1_AGREEMENT
    assert repair["ranking"][0]["name"] == "fc"
    assert repair["sensitivity_on"] == "8 calibration images the gate does not judge on"
    assert d["precision"]["float32_layers"] == ["fc"]
    assert d["precision"]["heavy_layers"]["FullyConnected"] == {"f32": 1}
    assert d["precision"]["heavy_layers"]["Convolution"] == {"bf16": 1}  # still bf16
    m.close()
    with Model.load(str(out)) as again:  # the mark travels in the artifact's IR
        assert again.spec.reduced_precision == section
    assert keep_f32.marked(load_artifact(out).payloads["model.xml"])


@needs_bf16
def test_bf16_without_repair_fails_the_gate(
    near_tie: Path, calib: Path, tiny_labels: Path, tmp_path: Path
) -> None:
    opts = {**TINY_BUILD, "engine": "openvino"}
    with pytest.raises(QuenchError, match=r"fidelity check failed.*artifact not written"):
        build(
            near_tie, tmp_path / "x.quench", precision="force_bfloat16", repair=False,
            calib_images=str(calib), labels=str(tiny_labels), **opts,
        )  # fmt: skip
    assert not (tmp_path / "x.quench").exists()


@needs_bf16
def test_float_layers_pinned_on_a_bf16_build(
    near_tie: Path, calib: Path, tiny_labels: Path, tmp_path: Path
) -> None:
    opts = {**TINY_BUILD, "engine": "openvino"}
    m = build(
        near_tie, tmp_path / "p.quench", precision="force_bfloat16", float_layers=("fc",),
        calib_images=str(calib), labels=str(tiny_labels), **opts,
    )  # fmt: skip
    d = m.spec.to_dict()
    assert d["reduced_precision"] == {"float32_layers": ["fc"], "requested": ["fc"]}
    assert d["fidelity"]["top1_agreement"] == 1.0
    m.close()
    with pytest.raises(QuenchError, match="--float-layers: gap not a Conv/Gemm/MatMul"):
        build(
            near_tie, tmp_path / "q.quench", precision="force_bfloat16", float_layers=("gap",),
            labels=str(tiny_labels), **opts,
        )  # fmt: skip


@needs_bf16
def test_diagnose_a_bf16_build(
    near_tie: Path, calib: Path, tiny_labels: Path, tmp_path: Path
) -> None:
    """``quench diagnose`` ranks a bf16 build's layers with the engine's kernels and shows which
    the artifact keeps in fp32."""
    from quench.builder import diagnose as dg
    from quench.builder.core import BuildOptions

    opts = {**TINY_BUILD, "engine": "openvino"}
    out = tmp_path / "bf16.quench"
    build(
        near_tie, out, precision="force_bfloat16", calib_images=str(calib),
        labels=str(tiny_labels), **opts,
    ).close()  # fmt: skip
    src, o, manifest = dg.options_of(out, near_tie)
    d = dg.diagnose(src, o, out, manifest)
    assert d.reduced_to == "bf16" and d.ranking[0] == "fc"
    rows = {r["name"]: r for r in d.layers}
    assert rows["fc"]["precision"] == "fp32" and rows["conv"]["precision"] == "bf16"
    assert rows["fc"]["kl_gain"] > 0 and d.all_int8["top1_agreement"] < 0.99
    onnx_opts = BuildOptions(
        precision="force_bfloat16", calib_images=str(calib), labels=str(tiny_labels), **opts
    )
    assert dg.diagnose(near_tie, onnx_opts).ranking[0] == "fc"  # from the ONNX model


def test_mark_finds_a_conv_whose_batchnorm_openvino_folded(tmp_path: Path) -> None:
    """Conv -> BatchNormalization: OpenVINO folds the BN into the conv, and the conv's own
    output name is gone; the layer is found through the BN's output tensor."""
    from conftest import make_classifier

    model = onnx.load(make_classifier(tmp_path / "bn.onnx"))
    for i, n in enumerate(model.graph.node):
        n.name = f"{n.op_type.lower()}{i}"
    xml, _ = loader.convert(model, None, False)
    layers = keep_f32.outputs_of(model, ["conv0"])
    assert layers["conv0"] == ["c", "b"]  # its output, then the BN's
    marked = keep_f32.marked(keep_f32.mark(xml, layers))
    kinds = {layer.get("name"): layer.get("type") for layer in ET.fromstring(xml).iter("layer")}
    assert "Convolution" in {kinds[m] for m in marked}  # the folded conv itself
