"""Precision modes, INT8 calibration (cache, determinism, bad images) and the accuracy gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import TINY_BUILD, make_calib_images, make_image
from quench.builder import build
from quench.errors import QuenchError
from quench.imaging import Normalizer, load_pixels

openvino = pytest.importorskip("openvino")
from quench.backend.openvino.loader import cpu_capabilities  # noqa: E402

CAPS = set(cpu_capabilities())  # as OpenVINO's kernels can run them ($ONEDNN_MAX_CPU_ISA)


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_calib_images(tmp_path_factory.mktemp("calib"), 16, seed=100)


@pytest.fixture(scope="module")
def check_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("check")
    for i in range(12):
        make_image(d / f"v{i:02d}.jpg", size=(50, 38 + 2 * i), seed=200 + i)
    return d


def _inputs(model_data, folder: Path) -> np.ndarray:
    norm = Normalizer(model_data)
    return norm.batch([load_pixels(p, model_data) for p in sorted(folder.glob("*.jpg"))])


def _fp32(tiny_model: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(tiny_model)).run(None, {"images": x})[0]


def _build(tmp_path: Path, tiny_model: Path, tiny_labels: Path, name: str, **kw):
    opts = {**TINY_BUILD, **kw}
    return build(tiny_model, tmp_path / f"{name}.quench", labels=str(tiny_labels), **opts)


# tolerance on the logits, relative to their largest magnitude, and minimum top-1 agreement
TOLERANCES = {
    ("force_float32", "onnxruntime"): (1e-5, 1.0),
    ("force_float32", "openvino"): (1e-5, 1.0),
    ("force_bfloat16", "openvino"): (2e-2, 0.9),
    ("force_float16", "openvino"): (2e-2, 0.9),
    ("qint8_mixed_float32", "onnxruntime"): (0.1, 0.8),
    ("qint8_mixed_float32", "openvino"): (0.1, 0.8),
    ("qint8_mixed_float16", "openvino"): (0.1, 0.8),
}


@pytest.mark.parametrize(("precision", "engine"), list(TOLERANCES))
def test_each_mode_is_close_to_fp32(
    tmp_path: Path,
    tiny_model: Path,
    tiny_labels: Path,
    calib_dir: Path,
    check_dir: Path,
    cache_env: Path,
    precision: str,
    engine: str,
) -> None:
    if precision == "force_bfloat16" and "BF16" not in CAPS:
        pytest.skip("no bfloat16 on this CPU")
    extra = {"calib_images": str(calib_dir)} if precision.startswith("qint8") else {}
    model = _build(
        tmp_path, tiny_model, tiny_labels, "m", precision=precision, engine=engine, **extra
    )
    assert model.manifest["precision"]["mode"] == precision
    assert model.manifest["engine"]["name"] == engine
    x = _inputs(model.data, check_dir)
    got, ref = model.predict(x), _fp32(tiny_model, x)
    rel_tol, min_agree = TOLERANCES[(precision, engine)]
    assert np.max(np.abs(got - ref)) <= rel_tol * np.max(np.abs(ref))
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= min_agree
    if precision.startswith("qint8"):
        q = model.manifest["quantization"]
        # one image in five held out of calibration for the fidelity check
        assert q["calibration"]["images"] == 13 and q["calibration"]["held_out"] == 3
        assert model.manifest["fidelity"]["source"] == "held-out calibration images"
        assert model.manifest["fidelity"]["images"] == 3
        assert "calibration.json" in model.artifact.payloads


def test_reduced_precision_is_not_fp32(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, check_dir: Path
) -> None:
    if "BF16" not in CAPS:
        pytest.skip("no bfloat16 on this CPU")
    model = _build(
        tmp_path, tiny_model, tiny_labels, "bf", precision="force_bfloat16", engine="openvino"
    )
    x = _inputs(model.data, check_dir)
    assert not np.array_equal(model.predict(x), _fp32(tiny_model, x))  # really bf16
    assert model.manifest["precision"]["computes"].startswith("bfloat16")


def test_onnxruntime_refuses_reduced_float(tmp_path: Path, tiny_model: Path, tiny_labels: Path):
    with pytest.raises(QuenchError, match="cannot run precision force_float16"):
        _build(
            tmp_path, tiny_model, tiny_labels, "x", precision="force_float16", engine="onnxruntime"
        )


def test_int8_needs_calibration_images(tmp_path: Path, tiny_model: Path, tiny_labels: Path):
    with pytest.raises(QuenchError, match="needs --calib-images"):
        _build(tmp_path, tiny_model, tiny_labels, "x", precision="qint8_mixed_float32")


def test_calibration_cache_round_trip_and_determinism(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, calib_dir: Path, cache_env: Path
) -> None:
    kw = {
        "precision": "qint8_mixed_float32",
        "engine": "onnxruntime",
        "calib_images": str(calib_dir),
    }
    logs: list[str] = []
    a = build(
        tiny_model,
        tmp_path / "a.quench",
        labels=str(tiny_labels),
        log=logs.append,
        **{**TINY_BUILD, **kw},
    )
    caches = list((cache_env / "calibration").glob("*.json"))
    assert len(caches) == 1
    assert a.manifest["quantization"]["cache"]["reused"] is False
    logs.clear()
    b = build(
        tiny_model,
        tmp_path / "b.quench",
        labels=str(tiny_labels),
        log=logs.append,
        **{**TINY_BUILD, **kw},
    )
    assert b.manifest["quantization"]["cache"]["reused"] is True
    assert any("reusing ranges" in line for line in logs)
    assert a.artifact.payloads == b.artifact.payloads
    assert a.manifest["content_digest"] == b.manifest["content_digest"]
    # without the cache: calibrated again, same bytes (deterministic)
    caches[0].unlink()
    c = _build(tmp_path, tiny_model, tiny_labels, "c", **kw)
    assert c.manifest["quantization"]["cache"]["reused"] is False
    assert c.artifact.payloads == a.artifact.payloads
    assert c.manifest["content_digest"] == a.manifest["content_digest"]


def test_explicit_cache_file_and_other_images(
    tmp_path: Path,
    tiny_model: Path,
    tiny_labels: Path,
    calib_dir: Path,
    check_dir: Path,
    cache_env: Path,
) -> None:
    cache = tmp_path / "ranges.json"
    kw = {"precision": "qint8_mixed_float32", "engine": "onnxruntime", "calib_cache": str(cache)}
    first = _build(tmp_path, tiny_model, tiny_labels, "a", calib_images=str(calib_dir), **kw)
    assert cache.is_file() and not first.manifest["quantization"]["cache"]["reused"]
    again = _build(tmp_path, tiny_model, tiny_labels, "b", calib_images=str(calib_dir), **kw)
    assert again.manifest["quantization"]["cache"]["reused"]
    logs: list[str] = []
    other = build(
        tiny_model,
        tmp_path / "c.quench",
        labels=str(tiny_labels),
        log=logs.append,
        **{**TINY_BUILD, **kw, "calib_images": str(check_dir)},
    )
    assert not other.manifest["quantization"]["cache"]["reused"]
    assert any("other inputs; recalibrating" in line for line in logs)


def test_calibration_cache_is_one_envelope(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, calib_dir: Path, cache_env: Path
) -> None:
    """The cache file, the artifact's calibration.json and ONNX Runtime's calibration cache are
    the same bytes; a cache of the old two-level format is refused in one line and replaced."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    cache = tmp_path / "ranges.json"
    old = {"format": "quench-calibration", "version": 1, "key": "k", "ranges": {}}
    cache.write_text(json.dumps(old))
    kw = {"precision": "qint8_mixed_float32", "engine": "onnxruntime", "calib_cache": str(cache)}
    logs: list[str] = []
    m = build(
        tiny_model,
        tmp_path / "m.quench",
        labels=str(tiny_labels),
        log=logs.append,
        **{**TINY_BUILD, **kw, "calib_images": str(calib_dir)},
    )
    assert any("older Quench" in line and "recalibrating" in line for line in logs)
    assert not m.manifest["quantization"]["cache"]["reused"]
    blob = cache.read_bytes()
    assert m.artifact.payloads["calibration.json"] == blob
    source = json.loads(blob)["quench"]["source"]
    assert source["key"] == m.manifest["quantization"]["cache"]["key"]
    assert source["images"]["sha256"] == m.manifest["quantization"]["calibration"]["sha256"]
    assert load_tensors_data(cache)  # ONNX Runtime's own reader


def test_unreadable_calibration_images(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, calib_dir: Path, cache_env: Path
) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    good = sorted(calib_dir.glob("*.jpg"))[:5]
    listing = tmp_path / "calib.txt"
    listing.write_text(
        "\n".join([str(good[0]), str(bad), str(tmp_path / "gone.jpg"), *map(str, good[1:])]) + "\n"
    )
    logs: list[str] = []
    m = build(
        tiny_model,
        tmp_path / "m.quench",
        labels=str(tiny_labels),
        log=logs.append,
        precision="qint8_mixed_float32",
        engine="onnxruntime",
        calib_images=str(listing),
        calib_count=10,
        **{k: v for k, v in TINY_BUILD.items() if k != "engine"},
    )
    cal = m.manifest["quantization"]["calibration"]
    assert cal["images"] == 4 and cal["held_out"] == 1 and cal["skipped"] == 2
    assert any("bad.jpg: not an image" in line for line in logs)
    assert any("gone.jpg: no such file" in line for line in logs)
    assert any(
        "4 usable images (1 more held out for the fidelity check), fewer than the 10" in line
        for line in logs
    )
    listing.write_text(f"{bad}\n{tmp_path / 'gone.jpg'}\n")
    with pytest.raises(QuenchError, match="none of the 2 calibration images could be read"):
        _build(
            tmp_path,
            tiny_model,
            tiny_labels,
            "n",
            precision="qint8_mixed_float32",
            calib_images=str(listing),
        )


def _labels_from(model, folder: Path, path: Path) -> Path:
    preds = model.classify(sorted(folder.glob("*.jpg")))
    path.write_text("".join(f"{p.source}\t{p.classes[0]}\n" for p in preds))
    return path


def test_accuracy_gate_passes_and_records(
    tmp_path: Path,
    tiny_model: Path,
    tiny_labels: Path,
    calib_dir: Path,
    check_dir: Path,
    cache_env: Path,
) -> None:
    fp32 = _build(tmp_path, tiny_model, tiny_labels, "fp32")
    gt = _labels_from(fp32, check_dir, tmp_path / "gt.tsv")
    m = _build(
        tmp_path,
        tiny_model,
        tiny_labels,
        "q",
        precision="qint8_mixed_float32",
        calib_images=str(calib_dir),
        check_images=str(check_dir),
        check_labels=str(gt),
        max_top1_drop=100.0,
    )
    acc = m.manifest["accuracy"]
    assert acc["measure"] == "labels" and acc["images"] == 12
    assert acc["fp32"] == {"top1": 1.0, "top5": 1.0}
    assert acc["passed"] is True
    assert acc["top1_drop_points"] == pytest.approx((1.0 - acc["built"]["top1"]) * 100)
    # without labels: agreement with the fp32 model
    m2 = _build(
        tmp_path,
        tiny_model,
        tiny_labels,
        "q2",
        precision="qint8_mixed_float32",
        calib_images=str(calib_dir),
        check_images=str(check_dir),
    )
    assert m2.manifest["accuracy"]["measure"] == "agreement with fp32 top-1"
    assert m2.manifest["accuracy"]["fp32"]["top1"] == 1.0


def test_accuracy_gate_fails(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, check_dir: Path, cache_env: Path
) -> None:
    # calibrating on flat grey images gives useless ranges: the INT8 model is far off
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (40, 40), (128, 128, 128)).save(flat / f"f{i}.png")
    out = tmp_path / "q.quench"
    with pytest.raises(QuenchError, match=r"accuracy check failed: top-1 dropped .* artifact not"):
        build(
            tiny_model,
            out,
            labels=str(tiny_labels),
            precision="qint8_mixed_float32",
            calib_images=str(flat),
            check_images=str(check_dir),
            max_top1_drop=0.5,
            **TINY_BUILD,
        )
    assert not out.exists()


def test_overlap_of_calibration_and_check_images_is_warned(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, calib_dir: Path, cache_env: Path
) -> None:
    logs: list[str] = []
    build(
        tiny_model,
        tmp_path / "m.quench",
        labels=str(tiny_labels),
        log=logs.append,
        precision="qint8_mixed_float32",
        calib_images=str(calib_dir),
        check_images=str(calib_dir),
        **TINY_BUILD,
    )
    assert any("also check images" in line for line in logs)


def test_auto_falls_back_to_the_next_candidate_that_passes(
    tmp_path: Path,
    tiny_model: Path,
    tiny_labels: Path,
    check_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from quench.builder import core

    real = core._accuracy_check
    seen: list[str] = []

    def first_fails(built, *args, **kwargs):
        seen.append(built.engine)
        result = real(built, *args, **kwargs)
        if len(seen) == 1:
            raise core.AccuracyGateError("accuracy check failed: simulated")
        return result

    monkeypatch.setattr(core, "_accuracy_check", first_fails)
    logs: list[str] = []
    opts = {**TINY_BUILD, "engine": "auto"}
    m = build(
        tiny_model,
        tmp_path / "m.quench",
        labels=str(tiny_labels),
        log=logs.append,
        select_seconds=0.05,
        select_budget=0.5,
        check_images=str(check_dir),
        max_top1_drop=50.0,
        **opts,
    )
    assert len(seen) == 2
    assert m.manifest["engine_selection"]["chosen"] == seen[1] == m.engine
    assert m.manifest["accuracy"]["passed"] is True
    assert any("rejected: accuracy check failed: simulated" in line for line in logs)


@pytest.mark.parametrize(
    ("keep_float", "fits", "quantized"),
    [(True, True, False), (False, True, True), (None, True, True), (None, False, False)],
)
def test_first_layer_float_or_quantized(
    tmp_path: Path,
    tiny_model: Path,
    tiny_labels: Path,
    calib_dir: Path,
    cache_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    keep_float: bool | None,
    fits: bool,
    quantized: bool,
) -> None:
    """--float-first-layer / --quantize-first-layer; neither: the pixel grid where the graph
    fits it (the tiny model starts with a plain Conv), else float."""
    from quench.builder.quantize import first_layer

    if not fits:
        monkeypatch.setattr(
            first_layer, "pixel_grid_first_conv", lambda model, *a: (model, None, [])
        )
    m = _build(
        tmp_path,
        tiny_model,
        tiny_labels,
        "m",
        precision="qint8_mixed_float32",
        calib_images=str(calib_dir),
        float_first_layer=keep_float,
    )
    assert m.manifest["build"].get("float_first_layer") is keep_float
    payload = m.artifact.payloads["model.onnx"]
    import onnx

    g = onnx.load_from_string(payload).graph
    first = next(n for n in g.node if "Conv" in n.op_type)
    # ONNX Runtime's optimised graph: a quantized conv is a QLinearConv
    assert (first.op_type == "QLinearConv") is quantized
    # quantized, it reads whole pixel values (the preset's normalisation undone in the graph),
    # its weights rounded by GPTQ
    q = m.manifest["quantization"]
    assert q["first_layer_pixel_grid"] is quantized
    assert q["first_layer_rounding"] == ("gptq" if quantized else None)
    if quantized:
        err = q["first_layer_output_error"]
        assert err["rounded"] < err["nearest"]


def test_auto_with_accuracy_check_also_tries_the_pixel_grid_first_layer(
    tmp_path: Path,
    tiny_model: Path,
    tiny_labels: Path,
    calib_dir: Path,
    check_dir: Path,
    cache_env: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """INT8 + --engine auto + an accuracy check: both first layers are candidates; the fastest
    that passes wins, and a failing pixel-grid candidate falls back to the float first layer."""
    from quench.builder import core

    real = core._accuracy_check
    tried: list[bool] = []

    def grid_fails(built, *args, **kwargs):
        grid = built.manifest["quantization"]["first_layer_pixel_grid"]
        tried.append(grid)
        result = real(built, *args, **kwargs)
        if grid:
            raise core.AccuracyGateError("accuracy check failed: simulated for the grid")
        return result

    def int8_auto(name: str):
        return build(
            tiny_model,
            tmp_path / f"{name}.quench",
            labels=str(tiny_labels),
            precision="qint8_mixed_float32",
            calib_images=str(calib_dir),
            select_seconds=0.05,
            select_budget=0.5,
            **{**TINY_BUILD, "engine": "auto"},
            check_images=str(check_dir),
            max_top1_drop=50.0,
        )

    monkeypatch.setattr(core, "_accuracy_check", grid_fails)
    m = int8_auto("m")
    sel = m.manifest["engine_selection"]
    assert {c["first_layer"] for c in sel["candidates"]} == {"float", "pixel grid"}
    assert sel["first_layer"] == "float"  # the grid candidates were rejected
    assert m.manifest["quantization"]["first_layer_pixel_grid"] is False
    assert False in tried and tried.index(False) == len(tried) - 1  # float tried last, passed
    assert m.manifest["accuracy"]["passed"] is True
    # without the simulated failure, the chosen candidate is the fastest one
    monkeypatch.setattr(core, "_accuracy_check", real)
    m2 = int8_auto("m2")
    sel2 = m2.manifest["engine_selection"]
    best = max(sel2["candidates"], key=lambda c: c["score"])
    if sel2["decision"] == "tie":  # a tie goes to the first in preference order
        best = sel2["candidates"][0]
    assert sel2["first_layer"] == best["first_layer"]
    grid = m2.manifest["quantization"]["first_layer_pixel_grid"]
    assert grid is (best["first_layer"] == "pixel grid")
