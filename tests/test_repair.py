"""Accuracy-aware mixed precision: layer sensitivity, the float-layer search and the repair."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from conftest import make_calib_images
from quench.builder import build, repair, sensitivity
from quench.builder.core import AccuracyGateError
from quench.builder.quantize import QuantConfig, quantize
from quench.builder.quantize.layers import check_names, layers, with_float_layers
from quench.cli import app
from quench.errors import QuenchError
from quench.imaging import Normalizer, load_pixels
from quench.model import Model
from quench.presets import get_preset
from quench.selfcheck import FidelityError

SIZE = 16
FRAGILE_BUILD = dict(
    preset="imagenet",
    resize=18,
    crop=SIZE,
    mean=(120.0, 115.0, 100.0),
    std=(60.0, 60.0, 60.0),
    engine="onnxruntime",
    precision="qint8_mixed_float32",
    float_first_layer=True,
    progress=False,
)


def make_fragile(path: Path, wide: float = 300.0, seed: int = 0) -> Path:
    """Conv -> Relu -> Conv "conv_b" (output channel 0 scaled by ``wide``) -> Relu -> Conv
    "fragile" (reads channel 0 scaled back) -> Relu -> Flatten -> Gemm "fc".

    The fragile Conv's input has one wide-range channel: its per-tensor uint8 range is set by
    that channel, so the others round to a few levels. Keeping just that layer in float fixes it.
    """
    rng = np.random.default_rng(seed)
    c, classes = 16, 10
    wa = rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3
    wb = rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.15
    wb[0] *= wide
    wc = rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.15
    wc[:, 0] /= wide
    fw = rng.standard_normal((classes, c * SIZE * SIZE)).astype(np.float32) / 64

    def bias(n: int) -> np.ndarray:
        return rng.normal(0, 0.1, n).astype(np.float32)

    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [
            (wa, "wa"),
            (bias(c), "ba"),
            (wb, "wb"),
            (bias(c), "bb"),
            (wc, "wc"),
            (bias(c), "bc"),
            (fw, "fw"),
            (bias(classes), "fb"),
        ]
    ]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["images", "wa", "ba"], ["a"], pads=pads, name="conv_a"),
        helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
        helper.make_node("Conv", ["ar", "wb", "bb"], ["b"], pads=pads, name="conv_b"),
        helper.make_node("Relu", ["b"], ["br"], name="relu_b"),
        helper.make_node("Conv", ["br", "wc", "bc"], ["c"], pads=pads, name="fragile"),
        helper.make_node("Relu", ["c"], ["cr"], name="relu_c"),
        helper.make_node("Flatten", ["cr"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "fragile",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def calib_x(calib_dir: Path) -> np.ndarray:
    """The calibration images, preprocessed as the build does."""
    data = (
        get_preset(FRAGILE_BUILD["preset"])
        .with_data(**{k: FRAGILE_BUILD[k] for k in ("resize", "crop", "mean", "std")})
        .data
    )
    return Normalizer(data).batch([load_pixels(p, data) for p in sorted(calib_dir.iterdir())])


@pytest.fixture(scope="module")
def fragile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fragile(tmp_path_factory.mktemp("fragile") / "fragile.onnx")


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_calib_images(tmp_path_factory.mktemp("calib"), 40, seed=100)


@pytest.fixture(scope="module")
def check_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_calib_images(tmp_path_factory.mktemp("check"), 40, seed=500)


@pytest.fixture(scope="module")
def quantized(fragile: Path, calib_x: np.ndarray):
    """The fragile model quantized on 24 calibration images, and the 16 others."""
    config = QuantConfig(bias_correction=False)
    return quantize(onnx.load(fragile), "images", calib_x[:24], config), calib_x[24:]


def test_with_float_layers_puts_only_the_named_layer_in_float(quantized) -> None:
    result, _ = quantized
    before = {x.name: x.precision for x in layers(result.model)}
    assert before == {"conv_a": "float", "conv_b": "int8", "fragile": "int8", "fc": "int8"}
    mixed = with_float_layers(result.model, result.float_model, ["fragile"])
    after = {x.name: x.precision for x in layers(mixed)}
    assert after == {**before, "fragile": "float"}
    onnx.checker.check_model(mixed)
    # its weights are the float model's, not the dequantized int8 ones
    node = next(n for n in mixed.graph.node if n.name == "fragile")
    inits = {t.name: numpy_helper.to_array(t) for t in mixed.graph.initializer}
    float_w = {t.name: t for t in result.float_model.graph.initializer}["wc"]
    assert np.array_equal(inits[node.input[1]], numpy_helper.to_array(float_w))


def test_sensitivity_ranks_the_fragile_layer_first(quantized) -> None:
    result, x = quantized
    ref = sensitivity.run(result.float_model, "images", x)["logits"]
    names = [n.name for n in layers(result.model) if n.precision == "int8"]
    base, each = sensitivity.sensitivity(
        result.model, result.float_model, "images", "logits", x, ref, names
    )
    ranking = sensitivity.rank(base, each)
    assert ranking[0] == "fragile"
    assert each["fragile"].kl < base.kl / 10  # in float, that layer takes most of the error away
    sqnr = sensitivity.layer_sqnr(result.model, result.float_model, "images", x)
    assert sqnr["conv_a"] > 100  # the float first layer is exact
    # the error appears at the fragile layer (and is carried on to the logits)
    assert sqnr["fragile"] < sqnr["conv_b"] - 10, sqnr


def _verdicts(need: int | None):
    """A judge that passes when at least ``need`` layers are in float (never for None)."""
    asked: list[int] = []

    def judge(names):
        asked.append(len(names))
        ok = need is not None and len(names) >= need
        return repair.Verdict({"k": len(names)}, ok, float(len(names)))

    return judge, asked


@pytest.mark.parametrize("need", [1, 2, 3, 5, 8, 13])
def test_search_finds_the_fewest_float_layers_in_log_steps(need: int) -> None:
    ranking = [f"l{i}" for i in range(13)]
    judge, asked = _verdicts(need)
    plan = repair.search(ranking, judge)
    assert plan.chosen == need and plan.float_layers == ranking[:need]
    assert len(asked) == len(set(asked)) <= 2 * 4 + 1  # galloping + bisection, never twice


def test_search_without_a_passing_mix_reports_the_best() -> None:
    judge, asked = _verdicts(None)
    plan = repair.search([f"l{i}" for i in range(6)], judge)
    assert plan.chosen is None and plan.float_layers is None
    assert plan.best is not None and plan.best.float_layers == 6  # the best score was judged
    assert 6 in asked


def test_check_names_suggests_the_closest() -> None:
    with pytest.raises(QuenchError, match=r"unknown layer 'fragil'; closest: fragile"):
        check_names(["fragil"], ["conv_a", "conv_b", "fragile", "fc"])


# -- the build ------------------------------------------------------------------------------


def _build(src: Path, out: Path, labels: Path, calib: Path, **kw) -> Model:
    return build(src, out, labels=str(labels), calib_images=str(calib), **{**FRAGILE_BUILD, **kw})


def _checked(src: Path, out: Path, labels: Path, calib: Path, check: Path, **kw) -> Model:
    """A build with an accuracy bound on the check images: a top-1 drop of 5 points (2 of 40)."""
    return _build(src, out, labels, calib, check_images=str(check), max_top1_drop=5.0, **kw)


def test_build_fails_its_bound_without_repair(
    fragile: Path, tiny_labels: Path, calib_dir: Path, check_dir: Path, tmp_path: Path, cache_env
) -> None:
    out = tmp_path / "f.quench"
    with pytest.raises(FidelityError, match="artifact not written"):
        _checked(fragile, out, tiny_labels, calib_dir, check_dir, repair=False)
    assert not out.exists()


def test_repair_keeps_exactly_the_fragile_layer_in_float(
    fragile: Path, tiny_labels: Path, calib_dir: Path, check_dir: Path, tmp_path: Path, cache_env
) -> None:
    out = tmp_path / "f.quench"
    lines: list[str] = []
    m = _checked(fragile, out, tiny_labels, calib_dir, check_dir, log=lines.append)
    q = m.manifest["quantization"]
    assert q["layers"] == {"conv_a": "float", "conv_b": "int8", "fragile": "float", "fc": "int8"}
    assert q["repair"]["float_layers"] == ["fragile"]
    assert q["repair"]["ranking"][0]["name"] == "fragile"
    assert q["repair"]["steps"][-1]["passed"] and q["repair"]["steps"][-1]["float_layers"] == 1
    assert m.manifest["accuracy"]["passed"]
    assert m.manifest["accuracy"]["top1_drop_points"] <= 5.0
    assert any("keeping 1 layer(s) in float: fragile" in line for line in lines)
    assert Model.load(out).manifest["quantization"]["repair"]["float_layers"] == ["fragile"]


def test_impossible_bound_fails_with_the_best_mix_and_writes_nothing(
    fragile: Path, tiny_labels: Path, calib_dir: Path, check_dir: Path, tmp_path: Path, cache_env
) -> None:
    out = tmp_path / "f.quench"
    with pytest.raises(FidelityError, match="no mix of float layers meets the bound") as e:
        _checked(
            fragile,
            out,
            tiny_labels,
            calib_dir,
            check_dir,
            int8_layers=("fragile",),
        )
    assert re.search(
        r"the best found keeps [12] of 2 layers in float \(top1_agreement", str(e.value)
    )
    assert "artifact not written" in str(e.value)
    assert not out.exists()


def test_float_layers_by_name(
    fragile: Path, tiny_labels: Path, calib_dir: Path, tmp_path: Path, cache_env
) -> None:
    m = _build(
        fragile,
        tmp_path / "f.quench",
        tiny_labels,
        calib_dir,
        float_layers=("fragile",),
        repair=False,
    )
    q = m.manifest["quantization"]
    assert q["layers"] == {"conv_a": "float", "conv_b": "int8", "fragile": "float", "fc": "int8"}
    assert q["float_layers"] == ["fragile"] and "repair" not in q
    # asked-for float layers stay float; the repair adds what the bound still needs
    m = _build(fragile, tmp_path / "g.quench", tiny_labels, calib_dir, float_layers=("fc",))
    q = m.manifest["quantization"]
    assert q["float_layers"] == ["fc", "fragile"] and q["repair"]["float_layers"] == ["fragile"]
    with pytest.raises(QuenchError, match=r"unknown layer 'conv-b'; closest: conv_b"):
        _build(fragile, tmp_path / "h.quench", tiny_labels, calib_dir, float_layers=("conv-b",))
    with pytest.raises(QuenchError, match=r"asked both in float and in INT8: fc"):
        _build(
            fragile,
            tmp_path / "i.quench",
            tiny_labels,
            calib_dir,
            float_layers=("fc",),
            int8_layers=("fc",),
        )


# -- quench diagnose ------------------------------------------------------------------------

FLAGS = ["--preset", "imagenet", "--resize", "18", "--crop", "16"]
FLAGS += ["--mean", "120,115,100", "--std", "60,60,60"]


def test_diagnose_a_model_ranks_the_fragile_layer_first(
    fragile: Path, tiny_labels: Path, calib_dir: Path, check_dir: Path, tmp_path: Path, cache_env
) -> None:
    page = tmp_path / "diag.html"
    args = [
        "diagnose",
        str(fragile),
        "--calib-images",
        str(calib_dir),
        "--labels",
        str(tiny_labels),
    ]
    args += [*FLAGS, "--check-images", str(check_dir), "--html", str(page), "--json", "-q"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["ranking"][0] == "fragile"
    rows = {row["name"]: row for row in d["layers"]}
    assert list(rows) == ["conv_a", "conv_b", "fragile", "fc"]  # graph order
    assert rows["fragile"]["rank"] == 1 and rows["fragile"]["top1_agreement_if_float"] > 0.9
    assert all(row["precision"] == "int8" for row in rows.values())
    assert rows["fragile"]["sqnr_db"] < rows["conv_b"]["sqnr_db"] - 10
    shares = [row["time_share"] for row in rows.values()]
    assert all(s > 0 for s in shares) and sum(shares) <= 1.0 + 1e-6  # from the profiler
    assert d["check"]["all_int8_top1_drop_points"] > 5
    assert "<img" in page.read_text() and page.with_suffix(".png").stat().st_size > 1000


def test_diagnose_an_artifact_shows_its_float_layers(
    fragile: Path, tiny_labels: Path, calib_dir: Path, check_dir: Path, tmp_path: Path, cache_env
) -> None:
    out = tmp_path / "f.quench"
    _checked(
        fragile,
        out,
        tiny_labels,
        calib_dir,
        check_dir,
        engine="openvino",
    )
    args = ["diagnose", str(out), "--source", str(fragile), "--json", "-q"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {row["name"]: row["precision"] for row in d["layers"]} == {
        "conv_a": "float", "conv_b": "int8", "fragile": "float", "fc": "int8"
    }  # fmt: skip
    assert d["engine"] == "openvino" and d["ranking"][0] == "fragile"
    # a source model that is neither beside the artifact nor in the working directory
    r = CliRunner().invoke(app, ["diagnose", str(out), "-q"])
    assert r.exit_code == 1 and "pass --source MODEL" in r.output
    other = tmp_path / "other.onnx"
    other.write_bytes(fragile.read_bytes()[:-1] + b"\0")
    r = CliRunner().invoke(app, ["diagnose", str(out), "--source", str(other), "-q"])
    assert r.exit_code == 1 and "not the model" in r.output


def test_fp32_runs_once_when_every_candidate_misses_the_check(
    fragile: Path,
    tiny_labels: Path,
    calib_dir: Path,
    check_dir: Path,
    tmp_path: Path,
    cache_env,
    monkeypatch,
) -> None:
    """Each candidate that misses the accuracy check hands over to the next; fp32's
    predictions on the check images are made once per build, not once per candidate."""
    from quench.builder import core

    made: list[int] = []
    real = core._reference_model
    monkeypatch.setattr(core, "_reference_model", lambda *a: made.append(1) or real(*a))
    lines: list[str] = []
    with pytest.raises(AccuracyGateError, match="artifact not written"):
        _build(
            fragile,
            tmp_path / "f.quench",
            tiny_labels,
            calib_dir,
            check_images=str(check_dir),
            max_top1_drop=-100.0,  # no build can gain 100 points: every candidate misses
            min_top1_agreement=0.0,
            engine="auto",
            repair=False,
            log=lines.append,
        )
    assert sum(line.startswith("accuracy on") for line in lines) >= 2
    assert made == [1]


def test_repair_and_diagnose_with_uint8_input(
    fragile: Path, tiny_labels: Path, calib_dir: Path, check_dir: Path, tmp_path: Path, cache_env
) -> None:
    """--input uint8: the repair judges its mixes on pixels, and diagnose feeds the artifact
    pixels; both find what the float-input build finds."""
    out = tmp_path / "u8.quench"
    m = _checked(fragile, out, tiny_labels, calib_dir, check_dir, input="uint8")
    assert m.manifest["io"]["input"]["dtype"] == "uint8"
    q = m.manifest["quantization"]
    assert q["repair"]["float_layers"] == ["fragile"] and m.manifest["accuracy"]["passed"]
    args = ["diagnose", str(out), "--source", str(fragile), "--json", "-q"]
    r = CliRunner().invoke(app, [*args, "--check-images", str(check_dir)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["ranking"][0] == "fragile" and d["check"]["engine_top1_drop_points"] <= 5.0
