"""quench.builder: manifest contents, numerical agreement with the source model, and refusals."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import quench
from conftest import NUM_CLASSES, SIZE, TINY_BUILD, make_classifier, make_image
from quench import artifact
from quench.builder import BuildOptions, build
from quench.errors import ModelError, QuenchError
from quench.external_data import external_data
from quench.imaging import load_pixels
from quench.labels import load_labels
from quench.model import Model
from quench.presets import IMAGENET_MEAN, IMAGENET_STD, DataConfig


@pytest.fixture(scope="module")
def fixed3(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_labels: Path) -> Path:
    out = tmp_path_factory.mktemp("fixed") / "tiny-b3.quench"
    build(tiny_model, out, labels=str(tiny_labels), batch=3, **TINY_BUILD)
    return out


def _session(model: Path | bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# -- manifest --------------------------------------------------------------------------------


def test_dynamic_batch_manifest(tiny_artifact: Path, tiny_model: Path, tiny_labels: Path) -> None:
    m = Model.load(tiny_artifact).manifest
    assert m["format_version"] == 1
    assert m["quench_version"] == quench.__version__
    assert m["source"] == {
        "file": "tiny.onnx",
        "sha256": hashlib.sha256(tiny_model.read_bytes()).hexdigest(),
        "size": tiny_model.stat().st_size,
        "opset": 13,
        "producer": "",
        "batch": {"declared": None, "mutable": True},  # probed: runs any batch
    }
    assert m["precision"]["mode"] == "force_float32"
    assert m["precision"]["stored"] == m["precision"]["computes"] == "float32"
    assert m["engine"]["name"] == "onnxruntime"
    assert m["engine"]["version"] == ort.__version__
    assert m["io"] == {
        "input": {"name": "images", "dtype": "float32", "shape": ["N", 3, SIZE, SIZE]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["N", NUM_CLASSES]},
    }
    assert m["batch"] == {"policy": "dynamic", "size": None}
    assert m["preprocess"] == {
        "resize": 36,
        "crop": 32,
        "interpolation": "bilinear",
        "mean": [120.0, 115.0, 100.0],
        "std": [60.0, 60.0, 60.0],
        "channel_order": "RGB",
        "layout": "NCHW",
    }
    assert m["preset"] == {"name": "imagenet", "chosen": "named"}
    assert m["output_kind"] == "logits"
    assert m["labels"] == [f"class-{i}" for i in range(NUM_CLASSES)]
    assert m["build"] == {
        "precision": "force_float32",
        "preset": "imagenet",
        "labels": str(tiny_labels),
        "engine": "onnxruntime",
        "mean": [120.0, 115.0, 100.0],
        "std": [60.0, 60.0, 60.0],
        "resize": 36,
        "crop": 32,
        "min_top1_agreement": 0.8,
    }
    created = datetime.fromisoformat(m["created"])
    assert created.tzinfo is not None
    assert abs(datetime.now(timezone.utc) - created) < timedelta(hours=1)
    assert 0 <= m["build_seconds"] < 60
    v = m["verification"]
    assert v["batch"] == 2
    assert 0 <= v["max_abs_diff"] < 1e-4
    assert v["max_abs_reference"] > 0.1
    assert v["top1_agreement"] == 1.0
    assert m["host"]["cores"] >= 1


def test_fixed_batch_manifest(fixed3: Path) -> None:
    model = Model.load(fixed3)
    m = model.manifest
    assert m["batch"] == {"policy": "fixed", "size": 3}
    assert m["io"]["input"]["shape"] == [3, 3, SIZE, SIZE]
    assert m["io"]["output"]["shape"] == [3, NUM_CLASSES]
    assert m["build"]["batch"] == 3
    assert m["verification"]["batch"] == 3
    assert m["verification"]["max_abs_diff"] < 1e-4
    assert model.batch_size == 3
    # the payload itself has the batch fixed
    payload = onnx.load_from_string(model.artifact.payloads["model.onnx"])
    dims = payload.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 3, SIZE, SIZE]


def test_build_returns_the_loaded_model(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path
) -> None:
    opts = BuildOptions(labels=str(tiny_labels), name="my-net", **TINY_BUILD)
    logs: list[str] = []
    out = tmp_path / "deep" / "er" / "x.quench"
    out.parent.mkdir(parents=True)  # a build creates no folders (test_cli: refused)
    model = build(tiny_model, out, opts, log=logs.append)
    assert model.path == out and out.is_file()
    assert model.name == "my-net"
    assert json.loads(json.dumps(model.manifest)) == Model.load(out).manifest
    assert logs[0] == "preset: imagenet (named)"
    assert any(line.startswith("checked against the source model") for line in logs)
    assert logs[-1].startswith(f"wrote {out}")


# -- numerics --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["dynamic", "fixed3"])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_predict_matches_onnxruntime(
    which: str, n: int, tiny_artifact: Path, fixed3: Path, tiny_model: Path
) -> None:
    x = np.random.default_rng(n).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
    expected = _session(tiny_model).run(["logits"], {"images": x})[0]
    with Model.load(tiny_artifact if which == "dynamic" else fixed3, threads=1) as model:
        got = model.predict(x)
        assert got.shape == (n, NUM_CLASSES)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        # any batch_size splits the same way for dynamic models; fixed ones ignore it
        np.testing.assert_allclose(model.predict(x, batch_size=2), expected, rtol=0, atol=1e-5)


def test_predict_edge_cases(fixed3: Path) -> None:
    with Model.load(fixed3, threads=1) as model:
        one = np.zeros((3, SIZE, SIZE), np.float32)
        assert model.predict(one).shape == (1, NUM_CLASSES)  # a single image, no batch axis
        assert model.predict(np.zeros((0, 3, SIZE, SIZE))).shape == (0, NUM_CLASSES)
        with pytest.raises(QuenchError, match=r"input shape \(2, 3, 40, 40\) does not match"):
            model.predict(np.zeros((2, 3, 40, 40), np.float32))
        with pytest.raises(QuenchError, match="batch of 4 exceeds the model's fixed batch 3"):
            model.run_batch(np.zeros((4, 3, SIZE, SIZE), np.float32))


def test_classify_applies_the_stored_preprocessing(
    tiny_artifact: Path, tiny_model: Path, tmp_path: Path
) -> None:
    img = make_image(tmp_path / "a.png", size=(61, 45), seed=3)
    px = load_pixels(img, DataConfig(resize=36, crop=32)).astype(np.float32)
    x = ((px - np.float32([120, 115, 100])) / np.float32(60)).transpose(2, 0, 1)[None]
    probs = _softmax(_session(tiny_model).run(["logits"], {"images": x})[0])[0]
    with Model.load(tiny_artifact, threads=1) as model:
        (pred,) = model.classify([img], topk=NUM_CLASSES)
    assert pred.ok
    assert pred.classes == list(np.argsort(-probs, kind="stable"))
    np.testing.assert_allclose(pred.scores, probs[pred.classes], atol=1e-5)
    assert pred.names == [f"class-{c}" for c in pred.classes]


# -- refusals --------------------------------------------------------------------------------


def _fails(
    tmp_path: Path, model: Path, exc: type[Exception], *phrases: str, **kwargs: object
) -> str:
    out = tmp_path / "never.quench"
    with pytest.raises(exc) as info:
        build(model, out, **kwargs)
    msg = str(info.value)
    for phrase in phrases:
        assert phrase in msg, msg
    assert not out.exists()
    assert list(tmp_path.glob("*.tmp")) == []
    return msg


def test_unknown_precision(tmp_path: Path, tiny_model: Path, tiny_labels: Path) -> None:
    _fails(
        tmp_path,
        tiny_model,
        QuenchError,
        "unknown precision 'int8'; choose one of force_float32",
        precision="int8",
        labels=str(tiny_labels),
        **TINY_BUILD,
    )


def test_unknown_preset_and_engine(tmp_path: Path, tiny_model: Path, tiny_labels: Path) -> None:
    _fails(
        tmp_path,
        tiny_model,
        QuenchError,
        "unknown preset 'resnet18'",
        "efficientnet-lite0, imagenet, inception-v2, resnet50-caffe2, resnet50-v1-7",
        preset="resnet18",
    )
    opts = {**TINY_BUILD, "labels": str(tiny_labels), "engine": "tensorrt"}
    _fails(tmp_path, tiny_model, QuenchError, "unknown engine 'tensorrt'", **opts)


@pytest.mark.parametrize("batch", [0, -2])
def test_bad_batch(tmp_path: Path, tiny_model: Path, tiny_labels: Path, batch: int) -> None:
    opts = {**TINY_BUILD, "labels": str(tiny_labels)}
    _fails(
        tmp_path,
        tiny_model,
        QuenchError,
        f"batch size must be >= 1, got {batch}",
        batch=batch,
        **opts,
    )


def test_missing_model(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    msg = _fails(tmp_path, missing, ModelError, "no such model file")
    assert msg.startswith(str(missing))


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"this is not onnx\n", "not an ONNX model (DecodeError"),
        (b"", "invalid ONNX model"),
    ],
)
def test_not_onnx(tmp_path: Path, content: bytes, phrase: str) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    msg = _fails(tmp_path, bad, ModelError, phrase, preset="imagenet")
    assert msg.startswith(f"{bad}: ")
    assert "\n" not in msg


def test_input_shape_does_not_match_crop(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path
) -> None:
    _fails(
        tmp_path,
        tiny_model,
        ModelError,
        str(tiny_model),
        "input 'images' has shape ['N', 3, 32, 32], expected [N, 3, 40, 40]",
        "--crop",
        preset="imagenet",
        crop=40,
        labels=str(tiny_labels),
    )
    # NHWC asked for an NCHW model
    _fails(
        tmp_path,
        tiny_model,
        ModelError,
        "expected [N, 32, 32, 3] for NHWC 32x32",
        preset="imagenet",
        layout="NHWC",
        **{k: v for k, v in TINY_BUILD.items() if k != "preset"},
    )


def test_label_count_mismatch(tmp_path: Path, tiny_model: Path) -> None:
    labels = tmp_path / "seven.txt"
    labels.write_text("".join(f"n{i}\n" for i in range(7)))
    _fails(
        tmp_path,
        tiny_model,
        ModelError,
        "the model has 10 classes but the label set has 7",
        "--labels",
        labels=str(labels),
        **TINY_BUILD,
    )
    # and the built-in 1000-class set for a 10-class model
    _fails(tmp_path, tiny_model, ModelError, "label set has 1000", **TINY_BUILD)


def test_preset_names_must_match(tmp_path: Path, tiny_model: Path, tiny_labels: Path) -> None:
    opts = {"labels": str(tiny_labels), "resize": 36, "crop": SIZE}
    _fails(
        tmp_path,
        tiny_model,
        ModelError,
        "input is 'images' but preset resnet50-v1-7 expects 'data'",
        preset="resnet50-v1-7",
        **opts,
    )
    other = make_classifier(tmp_path / "other.onnx", input_name="data", output_name="prob")
    _fails(
        tmp_path,
        other,
        ModelError,
        "no output 'resnetv17_dense0_fwd' (preset resnet50-v1-7); outputs are ['prob']",
        preset="resnet50-v1-7",
        **opts,
    )


# -- presets and data config -----------------------------------------------------------------


def test_detected_preset_with_other_preprocessing_is_named_for_its_file(tmp_path: Path) -> None:
    """Same tensor names, other data config (efficientnet-lite1 looks like -lite0): the
    artifact is named for its file, not for the preset it resembles."""
    src = make_classifier(
        tmp_path / "r50-at-240.onnx",
        size=240,
        classes=1000,
        input_name="data",
        output_name="resnetv17_dense0_fwd",
    )
    model = build(src, tmp_path / "x.quench", engine="onnxruntime", resize=274, crop=240)
    m = model.manifest
    assert m["preset"] == {"name": "resnet50-v1-7", "chosen": "detected"}
    assert m["name"] == "r50-at-240"
    assert m["preprocess"]["crop"] == 240


def test_preset_is_detected_from_tensor_names(tmp_path: Path) -> None:
    src = make_classifier(
        tmp_path / "r50ish.onnx",
        size=224,
        classes=1000,
        input_name="data",
        output_name="resnetv17_dense0_fwd",
    )
    model = build(src, tmp_path / "r50ish.quench", engine="onnxruntime")
    m = model.manifest
    assert m["preset"] == {"name": "resnet50-v1-7", "chosen": "detected"}
    assert m["name"] == "resnet50-v1-7"
    assert m["labels"] == load_labels("imagenet-1k") and len(m["labels"]) == 1000
    assert m["labels"][0] == "tench"
    assert m["preprocess"]["resize"] == 256 and m["preprocess"]["crop"] == 224
    np.testing.assert_allclose(m["preprocess"]["mean"], IMAGENET_MEAN)
    np.testing.assert_allclose(m["preprocess"]["std"], IMAGENET_STD)
    assert m["io"]["input"] == {"name": "data", "dtype": "float32", "shape": ["N", 3, 224, 224]}
    assert m["io"]["output"]["shape"] == ["N", 1000]
    assert "preset" not in m["build"]


def test_generic_preset_when_names_are_unknown(tmp_path: Path, tiny_labels: Path) -> None:
    src = make_classifier(tmp_path / "mynet.onnx", input_name="x", output_name="y")
    opts = {k: v for k, v in TINY_BUILD.items() if k != "preset"}
    m = build(src, tmp_path / "g.quench", labels=str(tiny_labels), **opts).manifest
    assert m["preset"] == {"name": "imagenet", "chosen": "generic"}
    assert m["name"] == "mynet"  # the file stem, since no preset named it
    assert m["io"]["input"]["name"] == "x" and m["io"]["output"]["name"] == "y"


def _nhwc_classifier(path: Path) -> Path:
    """The tiny classifier behind a Transpose, so it takes NHWC input."""
    nchw = onnx.load(make_classifier(path.with_suffix(".nchw.onnx"), seed=4))
    g = nchw.graph
    g.node.insert(0, helper.make_node("Transpose", ["pixels"], ["images"], perm=[0, 3, 1, 2]))
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", SIZE, SIZE, 3]))
    onnx.checker.check_model(nchw)
    onnx.save(nchw, path)
    return path


def test_custom_data_config_nhwc_bgr(tmp_path: Path, tiny_labels: Path) -> None:
    src = _nhwc_classifier(tmp_path / "nhwc.onnx")
    model = build(
        src,
        tmp_path / "nhwc.quench",
        engine="onnxruntime",
        labels=str(tiny_labels),
        preset="imagenet",
        mean=(10.0, 20.0, 30.0),
        std=(50.0, 60.0, 70.0),
        resize=40,
        crop=SIZE,
        interpolation="bicubic",
        channel_order="BGR",
        layout="NHWC",
        threads=1,
    )
    m = Model.load(model.path).manifest
    assert m["preprocess"] == {
        "resize": 40,
        "crop": SIZE,
        "interpolation": "bicubic",
        "mean": [10.0, 20.0, 30.0],
        "std": [50.0, 60.0, 70.0],
        "channel_order": "BGR",
        "layout": "NHWC",
    }
    assert m["io"]["input"] == {"name": "pixels", "dtype": "float32", "shape": ["N", 32, 32, 3]}
    assert {k: m["build"][k] for k in ("channel_order", "layout", "interpolation", "threads")} == {
        "channel_order": "BGR",
        "layout": "NHWC",
        "interpolation": "bicubic",
        "threads": 1,
    }
    assert m["verification"]["max_abs_diff"] < 1e-4

    # classify really applies them: RGB mean/std per channel, then BGR order, HWC layout
    img = make_image(tmp_path / "a.jpg", size=(50, 70), seed=5)
    px = load_pixels(img, DataConfig(resize=40, crop=SIZE, interpolation="bicubic"))
    x = ((px.astype(np.float32) - np.float32([10, 20, 30])) / np.float32([50, 60, 70]))[..., ::-1]
    probs = _softmax(_session(src).run(["logits"], {"pixels": x[None].copy()})[0])[0]
    (pred,) = model.classify([img], topk=3)
    model.close()
    assert pred.classes == list(np.argsort(-probs, kind="stable")[:3])
    np.testing.assert_allclose(pred.scores, probs[pred.classes], atol=1e-5)


def test_bad_data_config_values(tmp_path: Path, tiny_model: Path, tiny_labels: Path) -> None:
    base = {**TINY_BUILD, "labels": str(tiny_labels)}
    _fails(
        tmp_path,
        tiny_model,
        QuenchError,
        "std values must be positive",
        **{**base, "std": (1.0, 0.0, 1.0)},
    )
    _fails(tmp_path, tiny_model, QuenchError, "need 0 < crop <= resize", **{**base, "resize": 30})
    _fails(
        tmp_path,
        tiny_model,
        QuenchError,
        "interpolation must be one of",
        **base,
        interpolation="cubic",
    )
    _fails(
        tmp_path,
        tiny_model,
        QuenchError,
        "channel order must be RGB or BGR",
        **base,
        channel_order="GRB",
    )


# -- the ResNet-50 replica -------------------------------------------------------------------


def test_resnet50_replica_builds_and_classifies(tmp_path: Path) -> None:
    from quench.zoo.synth import synth_resnet50_v1

    src = tmp_path / "resnet50-v1-7.onnx"
    synth_resnet50_v1(src, seed=0)
    model = build(src, tmp_path / "r50.quench", batch=1, engine="onnxruntime")
    m = model.manifest
    assert m["preset"] == {"name": "resnet50-v1-7", "chosen": "detected"}
    assert m["source"]["opset"] == 7
    assert m["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert m["verification"]["top1_agreement"] == 1.0
    assert m["verification"]["max_abs_diff"] < 1e-3 * max(
        1.0, m["verification"]["max_abs_reference"]
    )

    img = make_image(tmp_path / "photo.jpg", size=(300, 260), seed=2)
    (pred,) = model.classify([img], topk=5)
    assert pred.ok and len(pred.classes) == 5 and len(set(pred.classes)) == 5
    assert pred.names == [load_labels("imagenet-1k")[c] for c in pred.classes]
    assert pred.scores == sorted(pred.scores, reverse=True) and 0 < sum(pred.scores) <= 1 + 1e-9

    px = load_pixels(img, DataConfig()).astype(np.float32)
    x = ((px - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)).transpose(2, 0, 1)[None]
    logits = model.predict(x)  # compiled == source was checked by the build's verification
    model.close()
    assert pred.classes[0] == int(np.argmax(logits))
    assert pred.scores[0] == pytest.approx(float(_softmax(logits)[0].max()), abs=1e-4)


def test_auto_engine_measures_candidates_and_keeps_the_fastest(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path
) -> None:
    opts = {**TINY_BUILD, "engine": "auto"}
    m = build(
        tiny_model,
        tmp_path / "auto.quench",
        labels=str(tiny_labels),
        select_seconds=0.1,
        select_budget=1,
        **opts,
    ).manifest
    sel = m["engine_selection"]
    assert sel["requested"] == "auto"
    assert {c["engine"] for c in sel["candidates"]} == {"onnxruntime", "openvino"}
    for c in sel["candidates"]:
        assert set(c["qps_by_batch"]) == {"1", "8"} and c["score"] > 0
    # the fastest beyond the noise, or on a tie the first in preference order (onnxruntime)
    best = max(sel["candidates"], key=lambda c: c["score"])
    if sel["decision"] == "clear":
        assert sel["chosen"] == best["engine"] == m["engine"]["name"]
    else:
        assert sel["decision"] == "tie" and "preference order" in sel["rule"]
        assert sel["chosen"] == "onnxruntime" == m["engine"]["name"]
    assert sel["candidates"][0]["engine"] == sel["chosen"]
    rounds = sel["rounds"]
    assert len(rounds) >= 3 and all(len(r) == len(sel["candidates"]) for r in rounds)
    for i, c in enumerate(sel["candidates"]):  # rounds listed in the candidates' order
        assert c["score"] == pytest.approx(np.median([r[i]["score"] for r in rounds]), abs=0.01)
        assert c["score_spread"]["n"] == len(rounds)
    assert sel["margin"]["over_candidate"] == 1 and sel["margin"]["rounds"] == len(rounds)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_forcing_an_engine(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, engine: str
) -> None:
    opts = {**TINY_BUILD, "engine": engine}
    model = build(tiny_model, tmp_path / f"{engine}.quench", labels=str(tiny_labels), **opts)
    m = model.manifest
    assert m["engine"]["name"] == engine
    assert m["engine_selection"] == {
        "requested": engine,
        "chosen": engine,
        "candidates": [{"engine": engine}],
    }
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(tiny_model)).run(None, {"images": x})[0]
    np.testing.assert_allclose(model.predict(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [None, 4])
def test_the_source_model_is_copied_once_per_batch_setting(
    tmp_path: Path,
    tiny_model: Path,
    tiny_labels: Path,
    monkeypatch: pytest.MonkeyPatch,
    batch: int | None,
) -> None:
    """However many engines compile it and checks run it, the build copies the source model
    (100 MB for ResNet-50) once for its batch size and once for a dynamic batch."""
    from quench import batch_form
    from quench.builder import core

    copies: list[int | None] = []
    real = core.set_batch

    def counted(model, b, *args):
        copies.append(b)
        return real(model, b, *args)

    monkeypatch.setattr(core, "set_batch", counted)
    monkeypatch.setattr(batch_form, "set_batch", counted)  # the probe's dynamic copy
    opts = {**TINY_BUILD, "engine": "auto"}
    m = build(
        tiny_model,
        tmp_path / "m.quench",
        labels=str(tiny_labels),
        batch=batch,
        select_seconds=0.05,
        **opts,
    )
    assert len(m.manifest["engine_selection"]["candidates"]) >= 2  # both engines compiled it
    assert sorted(copies, key=str) == ([None] if batch is None else [4, None])


# -- external data ---------------------------------------------------------------------------


def _with_external_data(src: Path, dst: Path, location: str) -> Path:
    model = onnx.load(src)
    onnx.save_model(
        model,
        dst,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return dst


def test_external_data_is_inlined_at_build(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source model whose weights live beside it: the artifact carries them (self-contained),
    and runs like the build of the same model in one file."""
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    split = _with_external_data(tiny_model, src_dir / "split.onnx", "split.weights")
    assert external_data(onnx.load(split, load_external_data=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # external data resolves against the model's folder
    out = tmp_path / "split.quench"
    build(split, out, labels=str(tiny_labels), **TINY_BUILD)
    (src_dir / "split.weights").unlink()
    payload = artifact.load(out).payloads["model.onnx"]
    assert external_data(onnx.load_from_string(payload)) == []
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with Model.load(out) as m:
        got = m.predict(x)
    want = _session(tiny_model).run(None, {"images": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("location", "phrase"), [("gone.bin", "gone.bin"), ("../up.bin", "")])
def test_unreadable_external_data_is_one_line(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, location: str, phrase: str
) -> None:
    d = tmp_path / "m"
    d.mkdir()
    split = _with_external_data(tiny_model, d / "split.onnx", "w.bin")
    model = onnx.load(split, load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (tmp_path / "up.bin").write_bytes((d / "w.bin").read_bytes())  # outside the model's folder
    onnx.save(model, split)
    msg = _fails(tmp_path, split, ModelError, "cannot read its external data", phrase,
                 labels=str(tiny_labels), **TINY_BUILD)  # fmt: skip
    assert msg.startswith(f"{split}: ") and "\n" not in msg
