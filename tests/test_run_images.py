"""Where ``quench run`` gets its images: the ImageNet sample in the cache (downloaded when the job
downloads its model), else deterministic synthetic calibration images; and what the report says."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from conftest import make_classifier, make_image
from quench import presets
from quench.builder.calibration import load_calibration
from quench.cli import app
from quench.errors import QuenchError
from quench.labels import imagenet_wnids
from quench.model import Model
from quench.precision import is_int8
from quench.report import SYNTHETIC_LINE
from quench.run import RunOptions, choose_calibration, run_job
from quench.zoo import sample, synth_images
from quench.zoo.fetch import cache_dir
from quench.zoo.sample import SampleSpec
from quench.zoo.synth_images import is_synthetic, synthetic_image, synthetic_images
from test_fetch import Server, _env  # noqa: F401  (_env: an isolated cache and no proxy)
from test_run import _tiny_options
from test_sample import _archive, _digest, _jpeg

FP32, INT8 = "force_float32", "qint8_mixed_float32"


def _options(model: Path, tiny_labels: Path, out: Path, **kw: Any) -> RunOptions:
    """The tiny model through the whole job, quickly; no data flags unless ``kw`` has them."""
    return _tiny_options({"model": model}, tiny_labels, out, **kw)


def _md(out: Path) -> str:
    return (out / "report.md").read_text()


# -- synthetic calibration images ---------------------------------------------------------------


def test_synthetic_images_are_deterministic_and_made_once(tmp_path: Path) -> None:
    a, b = synthetic_image(3), synthetic_image(3)
    assert a.shape == (synth_images.HEIGHT, synth_images.WIDTH, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, synthetic_image(4))
    assert 60 < a.mean() < 190 and a.std() > 20  # a photo-like range, not flat
    root = synthetic_images(3, progress=False)
    assert root == cache_dir() / "data" / "synthetic-calibration-v1"
    files = sorted(root.glob("*.jpg"))
    assert [f.name for f in files] == [f"synthetic-000{i}.jpg" for i in range(3)]
    stamps = [f.stat().st_mtime_ns for f in files]
    synthetic_images(5, progress=False)  # only the two missing ones are made
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert len(list(root.glob("*.jpg"))) == 5 and not list(root.glob(".*.tmp"))
    assert "1/f^s noise" in (root / synth_images.MARKER).read_text()
    assert is_synthetic(root) and is_synthetic(files[0]) and not is_synthetic(tmp_path)


def test_calibration_set_says_synthetic(image_dir: Path) -> None:
    data = presets.get_preset("imagenet").data
    synthetic = load_calibration(synthetic_images(5, progress=False), data, 4, progress=False)
    assert synthetic.synthetic and synthetic.kind == "synthetic calibration images"
    assert synthetic.describe()["synthetic"] is True
    real = load_calibration(image_dir, data, 4, progress=False)
    assert not real.synthetic and "synthetic" not in real.describe()  # cache keys unchanged


def test_unwritable_cache_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QUENCH_CACHE", str(blocker))
    with pytest.raises(QuenchError, match="cannot write synthetic calibration images to"):
        synthetic_images(2, progress=False)


# -- precedence ---------------------------------------------------------------------------------


def _write_sample(root: Path, names: list[str], truth: list[int] | None = None) -> Path:
    """A sample laid out like ``quench fetch imagenet-sample``'s: images/, lists, ground truth."""
    (root / "images").mkdir(parents=True)
    rel = []
    for i, name in enumerate(names):
        make_image(root / "images" / name, size=(40 + 3 * (i % 7), 44), seed=100 + i)
        rel.append(f"images/{name}")
    (root / "calib.txt").write_text("".join(f"{r}\n" for i, r in enumerate(rel) if i % 5 == 0))
    (root / "val.txt").write_text("".join(f"{r}\n" for i, r in enumerate(rel) if i % 5))
    gt = truth if truth is not None else [0] * len(rel)
    (root / "ground_truth.tsv").write_text(
        "file\tindex\n" + "".join(f"{r}\t{c}\n" for r, c in zip(rel, gt, strict=True))
    )
    return root


def test_calibration_precedence(tmp_path: Path) -> None:
    names = [f"s{i:02d}.jpg" for i in range(10)]
    opts = RunOptions(calib_count=4, progress=False)
    # nothing anywhere: synthetic images, calib_count plus the held-out quarter
    chosen = choose_calibration(opts)
    assert chosen.source == "synthetic" and is_synthetic(chosen.images)
    assert len(list(Path(chosen.images).glob("*.jpg"))) == 5
    assert "synthetic" in chosen.note and str(sample.sample_dir()) in chosen.note
    # the sample in the cache
    cached = _write_sample(sample.sample_dir(), names)
    chosen = choose_calibration(opts)
    assert (chosen.source, chosen.images) == ("ImageNet sample", str(cached / "calib.txt"))
    # --sample-dir before the cache (and only there)
    other = _write_sample(tmp_path / "other", names)
    chosen = choose_calibration(dataclasses.replace(opts, sample_dirs=[other]))
    assert chosen.images == str(other / "calib.txt")
    empty = dataclasses.replace(opts, sample_dirs=[tmp_path / "none"])
    assert choose_calibration(empty).source == "synthetic"
    # --calib-images before everything
    chosen = choose_calibration(dataclasses.replace(opts, calib_images=str(other / "images")))
    assert (chosen.source, chosen.images) == ("--calib-images", str(other / "images"))


# -- the main job -------------------------------------------------------------------------------


def test_no_sample_anywhere_int8_calibrates_on_synthetic_images(
    tiny_model: Path, tiny_labels: Path, tmp_path: Path
) -> None:
    """README command 1 offline: a synthetic-weight model, no sample in the (empty) cache."""
    model = onnx.load(str(tiny_model))
    model.producer_name = "quench-synth"  # what `quench zoo synth` writes
    synth = tmp_path / "synth.onnx"
    onnx.save(model, synth)
    out = tmp_path / "report"
    lines: list[str] = []
    res = run_job(_options(synth, tiny_labels, out, calib_count=8), log=lines.append)
    assert res.ok, [s.message for s in res.failed]
    doc = res.report.to_dict()  # as report.json has it
    int8 = [p for p in doc["precisions"] if is_int8(p)]
    assert int8 and FP32 in doc["precisions"]  # every precision, INT8 included
    builds = {b["precision"]: b for b in doc["builds"]}
    assert set(builds) == set(doc["precisions"])
    for p in int8:
        assert builds[p]["calibration"] == "synthetic"
        fid = builds[p]["fidelity"]
        assert fid["source"] == "held-out synthetic calibration images" and fid["passed"]
        with Model.load(builds[p]["artifact"]) as m:
            assert m.manifest["quantization"]["calibration"]["synthetic"] is True
    assert {r["precision"] for r in doc["perf"]} == set(doc["precisions"])
    assert doc["accuracy"] == [] and "sample" not in {s["kind"] for s in doc["steps"]}
    note = doc["data"]["accuracy_note"]
    assert note.startswith("Accuracy not measured: the model has synthetic weights")
    assert "--model REAL.onnx with `quench fetch imagenet-sample`" in note
    assert doc["data"]["calibration"] == "synthetic"
    md = _md(out)
    assert f"{int8[0]} (synthetic calibration)" in md and SYNTHETIC_LINE in md
    assert note in md and "synthetic images (speed only)" in md
    assert any("calibrated on deterministic synthetic images" in line for line in lines)
    assert len(list((cache_dir() / "data" / "synthetic-calibration-v1").glob("*.jpg"))) == 10


def test_cached_sample_gives_the_accuracy_tables(
    tiny_model: Path, tiny_labels: Path, tiny_artifact: Path, tmp_path: Path
) -> None:
    names = [f"s{i:02d}.jpg" for i in range(25)]
    root = _write_sample(sample.sample_dir(), names)
    with Model.load(tiny_artifact) as m:  # ground truth: the fp32 model's own top-1
        truth = [p.classes[0] for p in m.classify(sorted((root / "images").iterdir()), topk=1)]
    (root / "ground_truth.tsv").write_text(
        "file\tindex\n" + "".join(f"images/{n}\t{c}\n" for n, c in zip(names, truth, strict=True))
    )
    out = tmp_path / "report"
    lines: list[str] = []
    res = run_job(_options(tiny_model, tiny_labels, out, precisions=[FP32, INT8]), log=lines.append)
    assert res.ok, [s.message for s in res.failed]
    doc = res.report.to_dict()  # as report.json has it
    assert doc["data"]["calibration"] == "ImageNet sample" and doc["data"]["accuracy_note"] is None
    assert doc["data"]["calibration_images"] == str(root / "calib.txt")
    assert doc["data"]["evaluation_images"] == str(root / "val.txt")
    builds = {b["precision"]: b for b in doc["builds"]}
    assert builds[INT8]["calibration"] == "ImageNet sample"
    assert builds[INT8]["fidelity"]["source"] == "held-out calibration images"
    acc = {a["precision"]: a for a in doc["accuracy"]}
    assert set(acc) == {FP32, INT8} and acc[FP32]["top1"] == 1.0 and acc[FP32]["images"] == 20
    assert not (cache_dir() / "data" / "synthetic-calibration-v1").exists()
    md = _md(out)
    assert "| Model | Quant_Mode | Batch_Size | TOP1 | TOP5 | TOP1 vs fp32 | TOP5 vs fp32 |" in md
    a = acc[INT8]
    drop = (a["top1"] - 1.0) * 100
    assert f"| {INT8} | {a['batch']} | {a['top1']:.4f} | {a['top5']:.4f} | {drop:+.2f} pt |" in md
    assert "| vs fp32 |" in md and "| 1.00x |" in md  # fp32's own speed against itself
    assert "synthetic" not in md


# -- online: the model and the sample downloaded -------------------------------------------------

COUNT = 30  # sample images: 6 to calibrate on (5 + 1 held out), 24 to measure


def _sample_images() -> dict[str, bytes]:
    wnids = imagenet_wnids()
    return {f"{wnids[30 * k]}_photo{k}.JPEG": _jpeg(7 + k) for k in range(COUNT)}


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/sample.zip"


def _run_cli(out: Path) -> tuple[int, str, dict[str, Any]]:
    args = ["run", "--out", out, "--precisions", f"{FP32},{INT8}", "--engine", "onnxruntime"]
    args += ["--batches", "1", "--iterations", "2", "--warmup", "0", "--calib-count", "8"]
    args += ["--no-plots", "-q"]
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output, json.loads((out / "report.json").read_text())


def test_online_without_flags_fetches_the_model_and_the_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = make_classifier(
        tmp_path / "r50.onnx",
        size=224,
        classes=1000,
        input_name="data",
        output_name="resnetv17_dense0_fwd",
    ).read_bytes()
    model_server, sample_server = Server(), Server()
    try:
        model_server.body = body
        preset = presets.PRESETS["resnet50-v1-7"]
        monkeypatch.setitem(
            presets.PRESETS,
            "resnet50-v1-7",
            dataclasses.replace(preset, url=model_server.url, size=len(body), sha256=None),
        )
        images = _sample_images()
        sample_server.body = _archive(images)
        spec = SampleSpec(url=_closed_port_url(), images=COUNT, content_sha256=_digest(images))
        monkeypatch.setattr(sample, "SampleSpec", lambda: spec)
        out = tmp_path / "report"

        # offline for the sample (the model comes): INT8 on synthetic images, no accuracy
        code, output, doc = _run_cli(out)
        assert code == 0, output
        steps = {s["id"]: s for s in doc["steps"]}
        assert doc["model"]["source"].startswith("downloaded from http://127.0.0.1")
        assert steps["sample"]["status"] == "skipped"
        assert "cannot download imagenet-sample" in steps["sample"]["message"]
        assert doc["data"]["calibration"] == "synthetic" and doc["accuracy"] == []
        assert "quench fetch imagenet-sample" in doc["data"]["accuracy_note"]

        # online: the sample is downloaded into the cache; INT8 recalibrated on its calib.txt
        online = dataclasses.replace(spec, url=sample_server.url)
        monkeypatch.setattr(sample, "SampleSpec", lambda: online)
        code, output, doc = _run_cli(out)
        assert code == 0, output
        steps = {s["id"]: s for s in doc["steps"]}
        assert doc["model"]["source"] == "cache" and len(model_server.requests) == 1
        assert steps["sample"]["status"] == "ok" and len(sample_server.requests) == 1
        root = cache_dir() / "data" / "imagenet-sample"
        assert doc["data"]["calibration_images"] == str(root / "calib.txt")
        assert steps[f"build:{INT8}"]["status"] == "ok"  # not reused: new calibration images
        builds = {b["precision"]: b for b in doc["builds"]}
        assert builds[INT8]["calibration"] == "ImageNet sample"
        acc = {a["precision"]: a for a in doc["accuracy"]}
        assert set(acc) == {FP32, INT8} and acc[FP32]["images"] == COUNT - COUNT // 5
        assert "TOP1 vs fp32" in (out / "report.md").read_text()

        # again: everything from the cache, nothing downloaded
        code, output, doc = _run_cli(out)
        assert code == 0, output
        assert "sample" not in {s["id"] for s in doc["steps"]}
        assert len(model_server.requests) == 1 and len(sample_server.requests) == 1
        assert {a["precision"] for a in doc["accuracy"]} == {FP32, INT8}
    finally:
        model_server.close()
        sample_server.close()
