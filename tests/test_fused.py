"""``--input uint8``: fused preprocessing. The engine takes uint8 NHWC RGB pixels with the
channel order, mean/std and layout change in its graph; every feeder hands it pixels."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from typer.testing import CliRunner

from conftest import TINY_BUILD, edited_manifest, make_calib_images, make_classifier
from quench import artifact, perf, pipeline
from quench.backend.openvino.loader import OpenVinoEngine
from quench.builder import build
from quench.cli import app
from quench.errors import ArtifactError, QuenchError
from quench.imaging import Normalizer, load_pixels
from quench.manifest import Manifest
from quench.model import Model
from quench.presets import DataConfig
from quench.selfcheck import INPUTS

HEADER = "Inference-Header-Content-Length"

SIZE = TINY_BUILD["crop"]
INT8 = "qint8_mixed_float32"
ENGINES = ["onnxruntime", "openvino"]
PIXELS = (SIZE, SIZE, 3)


def data_of(**changes: Any) -> DataConfig:
    """The tiny builds' data config."""
    keys = ("resize", "crop", "mean", "std")
    return DataConfig(**{**{k: TINY_BUILD[k] for k in keys}, **changes})


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny classifier whose top-1 differs between the test images (seed 7)."""
    return make_classifier(tmp_path_factory.mktemp("fused") / "varied.onnx", seed=7)


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_calib_images(tmp_path_factory.mktemp("fused-calib"), 20, seed=300)


@pytest.fixture(scope="module")
def pixels(image_dir: Path) -> np.ndarray:
    """The test images as the pipeline crops them: uint8 (N, 32, 32, 3) RGB."""
    data = data_of()
    return np.stack([load_pixels(p, data) for p in sorted(image_dir.iterdir())])


@pytest.fixture(scope="module")
def uint8_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_labels: Path) -> Path:
    out = tmp_path_factory.mktemp("fused-art") / "u8.quench"
    src = make_classifier(out.with_suffix(".onnx"), seed=7)
    build(src, out, labels=str(tiny_labels), input="uint8", progress=False, **TINY_BUILD)
    return out


def _pair(
    src: Path, tmp: Path, labels: Path, **kw: Any
) -> tuple[Model, Model]:  # the float32-input and the uint8-input build of ``src``
    opts = {**TINY_BUILD, "progress": False, "labels": str(labels), **kw}
    return (
        build(src, tmp / "f32.quench", **opts),
        build(src, tmp / "u8.quench", input="uint8", **opts),
    )


def source_logits(src: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# -- the same answers as the float32-input build ----------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("precision", ["force_float32", INT8])
def test_uint8_build_classifies_like_the_float_build(
    engine: str,
    precision: str,
    varied: Path,
    calib: Path,
    image_dir: Path,
    pixels: np.ndarray,
    tiny_labels: Path,
    tmp_path: Path,
    cache_env: Path,
) -> None:
    extra = {"calib_images": str(calib)} if precision == INT8 else {}
    f32, u8 = _pair(
        varied,
        tmp_path,
        tiny_labels,
        engine=engine,
        precision=precision,
        check_images=str(image_dir),  # the accuracy check feeds the pipeline's uint8 batches
        **extra,
    )
    m = u8.manifest
    assert m["io"]["input"] == {"name": "images", "dtype": "uint8", "shape": ["N", *PIXELS]}
    assert m["preprocess"]["input"] == "uint8" and m["build"]["input"] == "uint8"
    assert "input" not in f32.manifest["preprocess"] and "input" not in f32.manifest["build"]
    assert "preprocess" in m["precision"] and "uint8" in m["precision"]["preprocess"]
    assert m["accuracy"]["passed"] and m["fidelity"]["passed"]
    if precision == INT8:
        assert m["fidelity"]["source"] == "held-out calibration images"
    files = sorted(image_dir.iterdir())
    a, b = f32.classify(files), u8.classify(files)
    assert len({p.classes[0] for p in a}) > 1  # a model that tells the images apart
    assert [p.classes for p in b] == [p.classes for p in a]
    np.testing.assert_allclose([p.scores for p in b], [p.scores for p in a], atol=1e-4)
    # tensors: pixels in, the float build's outputs on the same pixels normalised
    np.testing.assert_allclose(
        u8.predict(pixels), f32.predict(Normalizer(data_of()).batch(pixels)), atol=1e-4
    )


@pytest.mark.parametrize(
    "engine, precision, batch",
    [
        ("onnxruntime", "force_float32", 3),
        ("openvino", "force_float32", 3),
        ("openvino", "force_float16", None),
        ("openvino", "force_bfloat16", None),
    ],
)
def test_precisions_and_fixed_batch(
    engine: str,
    precision: str,
    batch: int | None,
    tiny_model: Path,
    pixels: np.ndarray,
    tiny_labels: Path,
    tmp_path: Path,
) -> None:
    if precision == "force_bfloat16" and not OpenVinoEngine().supports(precision):
        pytest.skip("no bfloat16 on this CPU")
    f32, u8 = _pair(
        tiny_model, tmp_path, tiny_labels, engine=engine, precision=precision, batch=batch
    )
    assert u8.manifest["io"]["input"]["shape"] == [batch or "N", *PIXELS]
    assert u8.fixed_batch == batch
    got = u8.predict(pixels)  # 7 images: a fixed batch of 3 pads the last one with uint8 zeros
    want = f32.predict(Normalizer(data_of()).batch(pixels))
    tol = 1e-4 if precision == "force_float32" else 2e-2 * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tol)


@pytest.mark.parametrize("engine", ENGINES)
def test_bgr_model_gets_its_channels_swapped(
    engine: str, varied: Path, pixels: np.ndarray, tiny_labels: Path, tmp_path: Path
) -> None:
    mean, std = (120.0, 110.0, 90.0), (50.0, 60.0, 70.0)
    _, u8 = _pair(
        varied, tmp_path, tiny_labels, engine=engine, channel_order="BGR", mean=mean, std=std
    )
    assert u8.manifest["preprocess"]["channel_order"] == "BGR"
    bgr = data_of(channel_order="BGR", mean=mean, std=std)
    got = u8.predict(pixels)
    want = source_logits(varied, Normalizer(bgr).batch(pixels))
    np.testing.assert_allclose(got, want, atol=1e-4)
    # the same pixels without the swap give other logits: the test sees a missing swap
    unswapped = source_logits(varied, Normalizer(data_of(mean=mean, std=std)).batch(pixels))
    assert np.abs(unswapped - want).max() > 0.05


def nhwc_model(path: Path) -> Path:
    """The tiny classifier behind a Transpose: its input is (N, 32, 32, 3) float."""
    m = onnx.load(make_classifier(path, seed=7))
    m.graph.node.insert(0, helper.make_node("Transpose", ["nhwc"], ["images_t"], perm=[0, 3, 1, 2]))
    for node in m.graph.node[1:]:
        node.input[:] = ["images_t" if t == "images" else t for t in node.input]
    m.graph.input[0].CopyFrom(
        helper.make_tensor_value_info("nhwc", onnx.TensorProto.FLOAT, ["N", SIZE, SIZE, 3])
    )
    onnx.checker.check_model(m)
    onnx.save(m, path)
    return path


@pytest.mark.parametrize("engine", ENGINES)
def test_nhwc_model(engine: str, pixels: np.ndarray, tiny_labels: Path, tmp_path: Path) -> None:
    src = nhwc_model(tmp_path / "nhwc.onnx")
    f32, u8 = _pair(src, tmp_path, tiny_labels, engine=engine, layout="NHWC")
    assert f32.manifest["io"]["input"]["shape"] == ["N", *PIXELS]  # float, NHWC
    assert u8.manifest["io"]["input"]["dtype"] == "uint8"
    x = Normalizer(data_of(layout="NHWC")).batch(pixels)
    np.testing.assert_allclose(u8.predict(pixels), source_logits(src, x), atol=1e-4)
    np.testing.assert_allclose(u8.predict(pixels), f32.predict(x), atol=1e-4)


def test_engine_auto_times_uint8_candidates(
    tiny_model: Path, tiny_labels: Path, tmp_path: Path
) -> None:
    opts = {**TINY_BUILD, "engine": "auto", "select_budget": 0.0}
    m = build(
        tiny_model,
        tmp_path / "auto.quench",
        labels=str(tiny_labels),
        input="uint8",
        progress=False,
        **opts,
    )
    sel = m.manifest["engine_selection"]
    assert len(sel["candidates"]) >= 2 and sel["rounds"]
    assert m.manifest["io"]["input"]["dtype"] == "uint8"


# -- the model, the pipeline and predict -------------------------------------------------------


def test_pipeline_hands_the_engine_uint8_batches(
    uint8_artifact: Path, image_dir: Path, pixels: np.ndarray
) -> None:
    m = Model.load(uint8_artifact)
    seen: list[tuple[Any, tuple[int, ...]]] = []
    run = m.run_batch

    def spy(batch: np.ndarray) -> np.ndarray:
        seen.append((batch.dtype, batch.shape[1:]))
        return run(batch)

    m.run_batch = spy  # type: ignore[method-assign]
    preds = m.classify(sorted(image_dir.iterdir()), batch_size=4)
    assert all(p.ok for p in preds) and len(seen) == 2
    assert seen == [(np.dtype(np.uint8), PIXELS)] * 2
    # the buffers themselves: the cropped pixels, untouched
    decoded = list(pipeline.batches(sorted(image_dir.iterdir()), m.data, 4))
    assert all(d.pixels.dtype == np.uint8 for d in decoded)
    np.testing.assert_array_equal(np.concatenate([d.pixels for d in decoded]), pixels)


def test_predict_refuses_a_float_tensor(uint8_artifact: Path, pixels: np.ndarray) -> None:
    m = Model.load(uint8_artifact)
    assert m.predict(pixels[0]).shape == (1, 10)  # one image
    with pytest.raises(QuenchError) as exc:
        m.predict(Normalizer(data_of()).batch(pixels))
    assert "takes uint8 RGB pixels (N, 32, 32, 3)" in str(exc.value)
    assert "\n" not in str(exc.value)
    with pytest.raises(QuenchError, match=r"does not match \(N, 32, 32, 3\)"):
        m.predict(pixels.transpose(0, 3, 1, 2).copy())


def test_selfcheck_stores_pixels_and_passes(uint8_artifact: Path) -> None:
    m = Model.load(uint8_artifact, check="always")
    assert m.selfcheck.ran and m.selfcheck.passed, m.selfcheck.message
    stored = np.load(io.BytesIO(m.artifact.payloads[INPUTS]))
    assert stored.dtype == np.uint8 and stored.shape[1:] == PIXELS
    r = CliRunner().invoke(app, ["verify", str(uint8_artifact)])
    assert r.exit_code == 0 and "passed" in r.stdout


# -- manifest ----------------------------------------------------------------------------------


def test_manifest_round_trip_and_info(uint8_artifact: Path) -> None:
    d = artifact.load(uint8_artifact).manifest
    m = Manifest.from_dict(d)
    assert m.to_dict() == d
    assert m.preprocess.pixels and m.preprocess.input_shape == PIXELS
    assert m.io.input.dtype == "uint8" and m.io.input.shape == ("N", *PIXELS)
    float_form = m.with_float_input()
    assert float_form.io.input.shape == ("N", 3, SIZE, SIZE)
    assert float_form.io.input.dtype == "float32" and not float_form.preprocess.pixels
    r = CliRunner().invoke(app, ["info", str(uint8_artifact)])
    assert r.exit_code == 0
    assert "uint8 pixels (N, 32, 32, 3) RGB" in r.stdout and '"input": "uint8"' in r.stdout


def test_old_manifest_without_the_field_loads_as_float32(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    def old(m: dict[str, Any]) -> None:
        m["io"]["input"].pop("dtype")
        m["preprocess"].pop("input", None)

    path = edited_manifest(tiny_artifact, tmp_path / "old.quench", old)
    m = Model.load(path)
    assert m.data.input == "float32" and m.spec.io.input.dtype == "float32"
    assert m.predict(np.zeros((1, 3, SIZE, SIZE), np.float32)).shape == (1, 10)


@pytest.mark.parametrize(
    "edit, field, phrase",
    [
        (lambda m: m["preprocess"].update(input="int8"), "preprocess.input", "float32, uint8"),
        (lambda m: m["io"]["input"].update(dtype="float32"), "io.input.dtype", "expected uint8"),
        (
            lambda m: m["preprocess"].pop("input"),
            "io.input.shape",
            'expected ["N", 3, 32, 32]',
        ),
    ],
)
def test_inconsistent_manifest_is_refused(
    uint8_artifact: Path, tmp_path: Path, edit: Any, field: str, phrase: str
) -> None:
    bad = edited_manifest(uint8_artifact, tmp_path / "bad.quench", edit)
    with pytest.raises(ArtifactError) as exc:
        Model.load(bad)
    msg = str(exc.value)
    assert msg.startswith(f"{bad}: manifest field '{field}': ") and phrase in msg, msg


def test_manifest_claiming_uint8_for_a_float_payload(tiny_artifact: Path, tmp_path: Path) -> None:
    def claim(m: dict[str, Any]) -> None:
        m["preprocess"]["input"] = "uint8"
        m["io"]["input"].update(dtype="uint8", shape=["N", *PIXELS])

    bad = edited_manifest(tiny_artifact, tmp_path / "claim.quench", claim)
    with Model.load(bad, check="off") as m, pytest.raises(ArtifactError) as exc:
        m.predict(np.zeros((1, *PIXELS), np.uint8))
    assert "manifest field 'io.input.dtype': uint8 does not match" in str(exc.value)


# -- CLI: build, perf --------------------------------------------------------------------------


def test_cli_build_flag(tiny_model: Path, tiny_labels: Path, tmp_path: Path) -> None:
    flags = ["--preset", "imagenet", "--resize", "36", "--crop", "32", "--engine", "onnxruntime"]
    flags += ["--labels", str(tiny_labels), "-q"]
    out = tmp_path / "u8.quench"
    r = CliRunner().invoke(
        app, ["build", str(tiny_model), "-o", str(out), "--input", "uint8", *flags]
    )
    assert r.exit_code == 0, r.output
    assert Model.load(out).data.input == "uint8"
    bad = tmp_path / "bad.quench"
    r = CliRunner().invoke(
        app, ["build", str(tiny_model), "-o", str(bad), "--input", "int8", *flags]
    )
    assert r.exit_code == 1 and not bad.exists()
    assert "unknown --input 'int8'; choose one of float32, uint8" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_perf_on_a_uint8_artifact(uint8_artifact: Path, image_dir: Path, tmp_path: Path) -> None:
    assert perf.random_batch(PIXELS, 2, "uint8").dtype == np.uint8
    out = tmp_path / "perf.json"
    args = ["perf", str(uint8_artifact), "--batch", "2", "--iterations", "3", "--warmup", "1"]
    r = CliRunner().invoke(app, [*args, "--images", str(image_dir), "--json", str(out), "-q"])
    assert r.exit_code == 0, r.output
    assert "end-to-end batch 2:" in r.stdout and "x engine-only" in r.stdout
    doc = json.loads(out.read_text())
    e2e = doc["end_to_end"][0]
    assert e2e["input"] == "uint8" and e2e["pipeline"]["failed"] == 0
    assert e2e["engine_only"]["images_per_s"] == doc["results"][0]["qps"]
    ratio = e2e["pipeline"]["images_per_s"] / e2e["engine_only"]["images_per_s"]
    assert e2e["pipeline_vs_engine_only"] == pytest.approx(ratio, rel=0.02, abs=1e-3)
    r = CliRunner().invoke(app, [*args, "--input-images", str(image_dir), "--profile", "-q"])
    assert r.exit_code == 0, r.output


# -- serve ---------------------------------------------------------------------------------------


def _serve(model: Model, requests: list[tuple[str, str, Any, dict[str, str]]]) -> list[Any]:
    httpx = pytest.importorskip("httpx")
    from quench.serve import ServeConfig, create_app

    app_ = create_app([model], ServeConfig(quiet=True, name="u8"))

    async def go() -> list[Any]:
        transport = httpx.ASGITransport(app=app_)
        async with (
            app_.app.router.lifespan_context(app_.app),  # start, then stop batcher and decoders
            httpx.AsyncClient(transport=transport, base_url="http://test") as ac,
        ):
            return [
                await (
                    ac.get(path)
                    if method == "GET"
                    else ac.post(path, content=body, headers=headers)
                )
                for method, path, body, headers in requests
            ]

    return asyncio.run(go())


def _infer(x: np.ndarray, datatype: str) -> bytes:
    t = {"name": "images", "datatype": datatype, "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"inputs": [t]}).encode()


def _binary(x: np.ndarray, datatype: str) -> bytes:
    raw = x.tobytes()
    t = {"name": "images", "datatype": datatype, "shape": list(x.shape)}
    t["parameters"] = {"binary_data_size": len(raw)}
    return json.dumps({"inputs": [t]}).encode()


def test_serve_takes_uint8_tensors_and_refuses_fp32(
    uint8_artifact: Path, pixels: np.ndarray, image_dir: Path
) -> None:
    pytest.importorskip("pydantic")
    m = Model.load(uint8_artifact)
    x = pixels[:3]
    jpeg = sorted(image_dir.iterdir())[0]
    head = _binary(x, "UINT8")
    meta, ok, wrong, big, binary, classify = _serve(
        m,
        [
            ("GET", "/v2/models/u8", None, {}),
            ("POST", "/v2/models/u8/infer", _infer(x, "UINT8"), {}),
            ("POST", "/v2/models/u8/infer", _infer(x.astype(np.float32), "FP32"), {}),
            ("POST", "/v2/models/u8/infer", _infer(x.astype(np.int64) + 200, "UINT8"), {}),
            ("POST", "/v2/models/u8/infer", head + x.tobytes(), {HEADER: str(len(head))}),
            ("POST", "/v2/models/u8/classify?topk=3", jpeg.read_bytes(), {}),
        ],
    )
    assert meta.json()["inputs"] == [
        {"name": "images", "datatype": "UINT8", "shape": [-1, *PIXELS]}
    ]
    assert ok.status_code == 200, ok.text
    out = ok.json()["outputs"][0]
    np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), m.predict(x), atol=1e-5)
    assert wrong.status_code == 400 and "send UINT8" in wrong.json()["error"]
    assert big.status_code == 400 and "integers 0..255" in big.json()["error"]
    assert binary.status_code == 200, binary.text
    raw = binary.json()["outputs"][0]["data"]  # JSON output: not asked for binary
    np.testing.assert_allclose(np.reshape(raw, (3, 10)), m.predict(x), atol=1e-5)
    expected = m.classify([jpeg], topk=3)[0]
    assert classify.status_code == 200
    assert [t["class"] for t in classify.json()["top"]] == expected.classes
