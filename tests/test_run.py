"""``quench run``: the one-click job (build, classify, eval, perf, report) and its step cache."""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from conftest import SIZE, make_image
from quench import presets
from quench import run as run_mod
from quench.cli import app
from quench.model import Model
from quench.run import RunOptions, run_job

runner = CliRunner()
PRECISIONS = "force_float32,qint8_mixed_float32"
STEPS = {"build", "classify", "eval", "perf"}


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def data(
    tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path, tiny_model: Path
) -> dict[str, Path]:
    """Images, a list file, and ground truth = the fp32 model's own top-1."""
    d = tmp_path_factory.mktemp("run-data")
    imgs = d / "images"
    imgs.mkdir()
    paths = [make_image(imgs / f"p{i}.jpg", size=(40 + 5 * i, 44), seed=10 + i) for i in range(8)]
    listing = d / "val.txt"
    listing.write_text("".join(f"images/{p.name}\n" for p in paths))
    with Model.load(tiny_artifact) as m:
        preds = m.classify(paths, topk=1)
    gt = d / "ground_truth.tsv"
    gt.write_text(
        "file\tindex\n" + "".join(f"images/{Path(p.source).name}\t{p.classes[0]}\n" for p in preds)
    )
    return {"dir": d, "images": listing, "labels": gt, "calib": imgs, "model": tiny_model}


def _args(data: dict[str, Path], tiny_labels: Path, out: Path, *extra: object) -> list[object]:
    return [
        "run",
        "--model",
        data["model"],
        "--preset",
        "imagenet",
        "--resize",
        36,
        "--crop",
        SIZE,
        "--mean",
        "120,115,100",
        "--std",
        "60",
        "--class-labels",
        tiny_labels,
        "--engine",
        "onnxruntime",
        "--batches",
        "1,2",
        "--iterations",
        3,
        "--warmup",
        1,
        "--out",
        out,
        "-q",
        *extra,
    ]


def _env(tmp: Path) -> dict[str, str]:
    return {"QUENCH_CACHE": str(tmp / "cache")}


@pytest.fixture(scope="module")
def full_run(
    tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path], tiny_labels: Path
) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("run") / "report"
    return invoke(*_full_args(data, tiny_labels, out), env=_env(out.parent)), out


def _full_args(data: dict[str, Path], tiny_labels: Path, out: Path) -> list[object]:
    """Every step: images with labels, INT8 calibration, all of PRECISIONS."""
    return _args(
        data,
        tiny_labels,
        out,
        "--images",
        data["images"],
        "--labels",
        data["labels"],
        "--calib-images",
        data["calib"],
        "--precisions",
        PRECISIONS,
    )


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def test_full_run_writes_report(full_run: tuple[Result, Path]) -> None:
    res, out = full_run
    assert res.exit_code == 0, (res.stdout, res.stderr)
    for name in ("report.md", "report.html", "report.json", "state.json"):
        assert (out / name).is_file(), name
    for plot in ("throughput", "latency", "accuracy"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = _report(out)
    assert {b["precision"] for b in doc["builds"]} == set(PRECISIONS.split(","))
    assert {(r["precision"], r["batch"]) for r in doc["perf"]} == {
        (p, b) for p in PRECISIONS.split(",") for b in (1, 2)
    }
    acc = {a["precision"]: a for a in doc["accuracy"]}
    assert acc["force_float32"]["top1"] == 1.0  # ground truth = fp32's own predictions
    assert doc["failed"] == [] and doc["machine"]["cores"] >= 1
    assert doc["machine"]["engines"]["onnxruntime"]
    md = (out / "report.md").read_text()
    assert "| Model | Quant_Mode | Batch_Size | Throughput (qps) | device |" in md
    assert "| Model | Quant_Mode | Batch_Size | TOP1 | TOP5 |" in md
    assert "top-5, force_float32" in res.stdout and "[class-" in res.stdout  # sample top-5


def test_report_figures_match_eval_and_perf(
    full_run: tuple[Result, Path], data: dict[str, Path], tmp_path: Path
) -> None:
    _, out = full_run
    doc = _report(out)
    for precision in PRECISIONS.split(","):
        art = out / "artifacts" / f"{precision}.quench"
        ev = invoke("eval", art, "--images", data["images"], "--labels", data["labels"], "--json")
        assert ev.exit_code == 0, ev.stderr
        got = json.loads(ev.stdout)
        mine = next(a for a in doc["accuracy"] if a["precision"] == precision)
        for k in ("top1", "top5", "images", "correct_top1", "correct_top5"):
            assert mine[k] == got[k], k
    art = out / "artifacts" / "force_float32.quench"
    pj = tmp_path / "perf.json"
    pf = invoke("perf", art, "--batch", "1", "--iterations", 3, "--warmup", 1, "-q", "--json", pj)
    assert pf.exit_code == 0, pf.stderr
    theirs = json.loads(pj.read_text())["results"][0]
    mine = next(r for r in doc["perf"] if r["precision"] == "force_float32" and r["batch"] == 1)
    assert set(mine) == set(theirs)
    assert set(mine["latency_ms"]) == set(theirs["latency_ms"])
    assert mine["qps"] > 0 and theirs["qps"] > 0


def test_html_is_self_contained(full_run: tuple[Result, Path]) -> None:
    _, out = full_run
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(b)[:4] == b"\x89PNG" for b in images)
    assert "Throughput (qps)" in page and "TOP1" in page and "CPU:" in page


def test_second_run_reuses_and_force_rebuilds(
    full_run: tuple[Result, Path],
    data: dict[str, Path],
    tiny_labels: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the machine as it was: whether noise or other programs force a new measurement is
    # test_speed_is_measured_again_when_the_machine_changed's business
    monkeypatch.setattr(run_mod._Job, "_speed_outdated", lambda self, stored: None)
    _, first = full_run
    out = first.parent / "again"
    shutil.copytree(first, out)  # same state, own folder: the other tests keep theirs
    args = _full_args(data, tiny_labels, out)
    again = invoke(*args, env=_env(first.parent))
    assert again.exit_code == 0, again.stderr
    steps = [s for s in _report(out)["steps"] if s["kind"] in STEPS]
    assert len(steps) == 8 and all(s["status"] == "reused" for s in steps), steps
    assert again.stderr.count("reused") == 8
    forced = invoke(*args, "--force", env=_env(first.parent))
    assert forced.exit_code == 0, forced.stderr
    steps = [s for s in _report(out)["steps"] if s["kind"] in STEPS]
    assert all(s["status"] == "ok" for s in steps) and "reused" not in forced.stderr


def test_failed_step_still_writes_report(
    data: dict[str, Path], tiny_labels: Path, tmp_path: Path
) -> None:
    out = tmp_path / "rep"
    res = invoke(
        *_args(
            data,
            tiny_labels,
            out,
            "--images",
            data["images"],
            "--labels",
            tmp_path / "missing.tsv",
            "--precisions",
            "force_float32",
        ),
        env=_env(tmp_path),
    )
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert res.stderr.strip().splitlines()[-1].startswith("error: 1 step(s) failed: eval:")
    doc = _report(out)
    assert [f["step"] for f in doc["failed"]] == ["eval:force_float32"]
    assert "missing.tsv" in doc["failed"][0]["error"]
    assert doc["perf"] and doc["builds"]  # what succeeded is reported
    assert "eval:force_float32" in (out / "report.md").read_text()
    assert "Failed steps" in (out / "report.html").read_text()


def _tiny_options(data: dict[str, Path], tiny_labels: Path, out: Path, **kw: Any) -> RunOptions:
    return RunOptions(
        model=data["model"],
        preset="imagenet",
        class_labels=str(tiny_labels),
        out=out,
        engine="onnxruntime",
        batches=[1],
        iterations=2,
        warmup=0,
        build_extra={"resize": 36, "crop": SIZE, "mean": (120.0, 115.0, 100.0), "std": (60.0,) * 3},
        progress=False,
        plots=False,
        **kw,
    )


def test_int8_without_calibration(
    data: dict[str, Path], tiny_labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --calib-images, no sample, and no synthetic images either (the cache is a file)."""
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("QUENCH_CACHE", str(tmp_path / "cache"))
    lines: list[str] = []
    nowhere = tmp_path / "no-sample"
    # asked for explicitly: the INT8 build fails, the rest is reported
    res = run_job(
        _tiny_options(
            data,
            tiny_labels,
            tmp_path / "a",
            precisions=["force_float32", "qint8_mixed_float32"],
            sample_dirs=[nowhere],
        ),
        log=lines.append,
    )
    assert not res.ok
    assert [s.id for s in res.failed] == ["build:qint8_mixed_float32"]
    assert "calibration" in res.failed[0].message and str(nowhere) in res.failed[0].message
    assert "cannot write synthetic calibration images" in res.failed[0].message
    doc = _report(tmp_path / "a")
    assert doc["failed"][0]["step"] == "build:qint8_mixed_float32"
    assert [r["precision"] for r in doc["perf"]] == ["force_float32"]
    # by default: every precision the engine runs; INT8 skipped with a clear line, not a failure
    lines.clear()
    res = run_job(
        _tiny_options(data, tiny_labels, tmp_path / "b", sample_dirs=[nowhere]),
        log=lines.append,
    )
    assert res.ok, [s.message for s in res.failed]
    assert any("INT8 builds skipped" in line and str(nowhere) in line for line in lines)
    assert any("no --images" in line for line in lines)  # eval skipped, said where it looked
    assert {s.status for s in res.steps if s.kind == "eval"} == {"skipped"}


def test_sample_data_is_found(
    data: dict[str, Path], tiny_labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUENCH_CACHE", str(tmp_path / "cache"))
    sample = data["dir"]  # holds val.txt and ground_truth.tsv, like the ImageNet sample
    lines: list[str] = []
    res = run_job(
        _tiny_options(
            data, tiny_labels, tmp_path / "rep", precisions=["force_float32"], sample_dirs=[sample]
        ),
        log=lines.append,
    )
    assert res.ok
    assert res.report.accuracy[0].top1 == 1.0
    assert any(str(sample / "val.txt") in line for line in lines)


def test_offline_without_model_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is
    preset = presets.PRESETS["resnet50-v1-7"]
    monkeypatch.setitem(
        presets.PRESETS, "resnet50-v1-7", replace(preset, url=f"http://127.0.0.1:{port}/r.onnx")
    )
    t = time.perf_counter()
    res = invoke("run", "--out", tmp_path / "rep", "--no-plots", "-q", env=_env(tmp_path))
    assert time.perf_counter() - t < 10
    assert res.exit_code == 1 and "Traceback" not in res.output
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot download resnet50-v1-7") and "--model" in last
    assert _report(tmp_path / "rep")["failed"][0]["step"] == "model"


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no Chromium (CI installs it)")
def test_html_renders_in_chromium(full_run: tuple[Result, Path], tmp_path: Path) -> None:
    """The report opens in headless Chromium with no errors and every plot decoded."""
    playwright = pytest.importorskip("playwright.sync_api")
    _, out = full_run
    errors: list[str] = []
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1280, "height": 2000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
        page.goto((out / "report.html").as_uri())
        widths = page.evaluate("Array.from(document.images).map(i => i.complete && i.naturalWidth)")
        tables = page.evaluate("document.querySelectorAll('table').length")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert len(widths) >= 3 and all(w and w > 100 for w in widths), widths
    assert tables >= 2
    assert (tmp_path / "report.png").stat().st_size > 20_000


def test_synthetic_model_skips_accuracy(
    data: dict[str, Path], tiny_labels: Path, tmp_path: Path
) -> None:
    import onnx

    model = onnx.load(str(data["model"]))
    model.producer_name = "quench-synth"  # what `quench zoo synth` writes
    synth = tmp_path / "synth.onnx"
    onnx.save(model, synth)
    args = _args(
        {**data, "model": synth},
        tiny_labels,
        tmp_path / "out",
        "--precisions",
        "force_float32",
        "--images",
        data["images"],
    )
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    text = json.dumps(doc)
    assert "synthetic weights" in text
    kinds = {(s["kind"], s["status"]) for s in doc["steps"]}
    assert ("eval", "skipped") in kinds and ("perf", "ok") in kinds


def test_speed_is_measured_again_when_the_machine_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored speed figures are reused only when they were stable and other programs keep
    about as many cores busy now as then (CPU, engine and Quench versions are in the key)."""
    job = run_mod._Job(RunOptions(out=tmp_path, progress=False), lambda m: None, None)
    monkeypatch.setattr(run_mod, "other_work_now", lambda: 0.1)
    quiet = {"other_cores": 0.05, "cores": 2}
    stable = {"results": [{"qps_spread": {"cv": 0.01}, "warnings": [], "machine_load": quiet}]}
    assert job._speed_outdated(stable) is None
    unstable = {"results": [{**stable["results"][0], "warnings": ["batch 1 throughput: varied"]}]}
    assert "unstable (batch 1 throughput: varied)" in job._speed_outdated(unstable)
    busy_then = {"results": [{**stable["results"][0], "machine_load": {"other_cores": 0.9}}]}
    assert "0.90 cores busy then and 0.10 now" in job._speed_outdated(busy_then)
    assert "no rounds" in job._speed_outdated({"results": [{"qps": 5.0}]})
    job._other_now = 1.2  # a busy machine now: stable quiet figures no longer describe it
    assert "0.05 cores busy then and 1.20 now" in job._speed_outdated(stable)


def test_byte_identical_builds_are_measured_once(
    data: dict[str, Path], tiny_labels: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builds whose artifacts hash the same: the second is classified, evaluated and timed
    not at all (its figures would be the first one's, plus noise) and shown as the same."""
    monkeypatch.setattr(run_mod, "sha256_file", lambda path: "same" * 16)
    out = tmp_path / "out"
    res = invoke(*_full_args(data, tiny_labels, out))
    assert res.exit_code == 0, res.output
    doc = _report(out)
    steps = {s["id"]: s for s in doc["steps"]}
    for kind in ("classify", "eval", "perf"):
        assert steps[f"{kind}:force_float32"]["status"] == "ok"
        second = steps[f"{kind}:qint8_mixed_float32"]
        assert second["status"] == "skipped"
        assert second["message"] == "same artifact as force_float32 (byte-identical)"
    assert {r["precision"] for r in doc["perf"]} == {"force_float32"}
    assert doc["builds"][1]["same_as"] == "force_float32"
    assert "same artifact as force_float32" in (out / "report.md").read_text()


def test_which_builds_get_the_calibration_images() -> None:
    from quench.run import half_options, takes_images

    assert takes_images("qint8_mixed_float16")
    assert takes_images("force_bfloat16") and takes_images("force_float16")  # gate and repair
    assert not takes_images("force_float32")
    # synthetic images: the gate alone, at INT8's bound (speed-only rows); photos: the defaults
    assert half_options("force_bfloat16", "synthetic") == {
        "repair": False,
        "min_top1_agreement": 0.8,
    }
    assert half_options("force_bfloat16", "ImageNet sample") == {}
    assert half_options("qint8_mixed_float16", "synthetic") == {}
