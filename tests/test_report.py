"""The report's data and text: stability warnings, verdict, comparison columns (no real run:
figures are injected)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quench import report
from quench.perf import PerfResult
from quench.pipeline import Prediction
from quench.records import BuildRecord, EvalRecord, PerfRecord, Step
from quench.report import ReportDoc, plots


def perf_result(precision: str, batch: int, rounds: list[float], warnings=()) -> PerfResult:
    from quench.stats import spread

    qps = sum(rounds) / len(rounds)
    return PerfResult.from_dict({
        "model": "m",
        "precision": precision,
        "engine": "onnxruntime",
        "batch": batch,
        "threads": 2,
        "iterations": 10,
        "seconds": 1.0,
        "qps": qps,
        "latency_ms": {"p50": 1.0, "p90": 1.1, "p99": 1.2, "mean": 1.0, "min": 0.9, "max": 1.3},
        "compute": "float32",
        "peak_share": None,
        "requests": 1,
        "rounds": [{"qps": q, "seconds": 0.2} for q in rounds],
        "qps_spread": spread(rounds).to_dict(),
        "machine_load": {"other_cores": 0.1, "cores": 2},
        "warnings": list(warnings),
    })  # fmt: skip


def job(perf: list[PerfResult], **extra: Any) -> ReportDoc:
    steps = [
        Step(f"perf:{r.precision}:{r.batch}", "perf", r.precision, "ok", 1.0, "",
             PerfRecord([r]))
        for r in perf
    ]  # fmt: skip
    rec = report.JobRecord(options={}, steps=steps, **extra)
    return report.collect(rec)


def test_unstable_figures_are_flagged_in_json_and_text(tmp_path: Path) -> None:
    doc = job(
        [
            perf_result("force_float32", 1, [100, 101, 99]),
            perf_result("force_float32", 8, [60, 120, 90], ["batch 8 throughput: varied 33%"]),
        ]
    )
    assert doc.stability.unstable is True
    assert doc.stability.warnings == ["batch 8 throughput: varied 33%"]
    files = report.write(doc, tmp_path, plots=False)
    md = files["md"].read_text()
    assert "> **Warning:** the speed figures below are unstable" in md
    assert "90.00!" in md  # the unstable figure is marked
    assert "class='warning'" in files["html"].read_text() and "> - batch 8 throughput" in md
    quiet = job([perf_result("force_float32", 1, [100, 101, 99])])
    assert quiet.stability.unstable is False
    assert "Warning" not in report.markdown(quiet, {}, tmp_path)


def build(precision: str, sha: str, agreement: float | None = None) -> BuildRecord:
    fid = None if agreement is None else {"top1_agreement": agreement, "sqnr_db": 30.0,
                                          "images": 8, "source": "held-out"}  # fmt: skip
    return BuildRecord(f"{precision}.quench", sha, 1000, "d" + sha, "m", "openvino", "1",
                       "x", fid, 1.0)  # fmt: skip


def accuracy(precision: str, top1: float) -> EvalRecord:
    return EvalRecord("m", precision, "openvino", top1, 0.95, 100, batch=8)


def full_doc(tmp_path: Path) -> ReportDoc:
    """fp32; INT8 3x faster, -0.25 points; a 'lossy' build faster still but -6 points; a
    byte-identical copy of the INT8 build; bf16 and INT8 tied at batch 1 (noise)."""
    from PIL import Image

    img = tmp_path / "cat.png"
    Image.new("RGB", (60, 40), (200, 10, 10)).save(img)
    perf = [
        perf_result("force_float32", 1, [50, 51, 49, 50]),
        perf_result("force_float32", 8, [60, 61, 59, 60]),
        perf_result("force_bfloat16", 1, [100, 110, 90, 100]),
        perf_result("force_bfloat16", 8, [100, 101, 99, 100]),
        perf_result("qint8_mixed_float32", 1, [102, 92, 112, 100]),
        perf_result("qint8_mixed_float32", 8, [180, 181, 179, 180]),
        perf_result("lossy", 1, [300, 301, 299, 300]),
        perf_result("lossy", 8, [400, 401, 399, 400]),
    ]
    builds = {
        "force_float32": build("force_float32", "a"),
        "force_bfloat16": build("force_bfloat16", "b", 0.99),
        "qint8_mixed_float32": build("qint8_mixed_float32", "c", 0.97),
        "qint8_mixed_float16": build("qint8_mixed_float16", "c", 0.97),
        "lossy": build("lossy", "d", 0.5),
    }
    pred = Prediction(str(img), [1], [0.9], ["tabby"])
    doc = job(perf, builds=builds)
    doc.accuracy = [
        accuracy("force_float32", 0.80),
        accuracy("force_bfloat16", 0.80),
        accuracy("qint8_mixed_float32", 0.7975),
        accuracy("lossy", 0.74),
    ]
    doc.classify = {p: [pred] for p in builds}
    doc.versus_fp32 = report.versus_fp32(doc)
    doc.verdict = report.verdict(doc)
    return doc


def test_verdict_fastest_within_the_accuracy_bound(tmp_path: Path) -> None:
    doc = full_doc(tmp_path)
    v = doc.verdict
    b8 = v.batches["8"]
    # "lossy" is fastest but loses 6 points: outside the 1-point bound
    assert b8.fastest == "qint8_mixed_float32" and b8.speedup == 3.0
    assert b8.top1_change_points == -0.25 and b8.tied_with == []
    # batch 1: bf16 and INT8 are inside each other's noise: the tie goes to the more accurate
    b1 = v.batches["1"]
    assert b1.fastest == "force_bfloat16" and b1.tied_with == ["qint8_mixed_float32"]
    lines = report.verdict_lines(doc)
    assert (
        "batch 8: the fastest build within 1 top-1 point of fp32 is **qint8_mixed_float32**"
        in (lines[1])
    )
    assert "3.00x fp32, top-1 -0.25 points" in lines[1] and "a tie within the noise" in lines[0]


def test_versus_fp32_and_identical_builds(tmp_path: Path) -> None:
    doc = full_doc(tmp_path)
    builds = {b["precision"]: b for b in doc.to_dict()["builds"]}
    assert builds["qint8_mixed_float16"]["same_as"] == "qint8_mixed_float32"
    assert "same_as" not in builds["qint8_mixed_float32"]
    vs = {v.precision: v for v in doc.versus_fp32}
    assert vs["qint8_mixed_float32"].speedup["8"] == report.Speedup(3.0, True)
    assert vs["qint8_mixed_float32"].top1_change_points == -0.25
    assert vs["lossy"].top1_change_points == -6.0
    assert vs["force_float32"].speedup["8"] == report.Speedup(1.0, False)
    rows = {r[0]: r for r in report.versus_rows(doc)}
    assert rows["qint8_mixed_float32"][1] == "b1: 2.03x, b8: 3.00x"
    assert rows["qint8_mixed_float32"][2] == "-0.25 points"
    assert rows["qint8_mixed_float16"][1] == "same artifact as qint8_mixed_float32"
    assert rows["force_float32"][1] == "the reference"
    # the perf table's "vs fp32" column is the same noise-aware figure
    perf = {(r[1], r[2]): r[-1] for r in report.perf_rows(doc)}
    assert perf[("qint8_mixed_float32", "8")] == "3.00x" and perf[("force_float32", "1")] == "1.00x"
    int8_b8 = next(r for r in doc.perf if (r.precision, r.batch) == ("qint8_mixed_float32", 8))
    int8_b8.rounds = [{"qps": q, "seconds": 0.2} for q in (180, 40, 400, 100)]  # noisy
    doc.versus_fp32 = report.versus_fp32(doc)
    perf = {(r[1], r[2]): r[-1] for r in report.perf_rows(doc)}
    assert perf[("qint8_mixed_float32", "8")].endswith("(tie)")


def test_report_text_verdict_thumbnails_and_axes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = full_doc(tmp_path)
    ylims: dict[str, tuple[float, float]] = {}
    real_save = plots._save
    monkeypatch.setattr(
        plots, "_save", lambda fig, path: (ylims.__setitem__(path.stem, fig.axes[0].get_ylim()),
                                            real_save(fig, path))[1]
    )  # fmt: skip
    files = report.write(doc, tmp_path / "out")
    assert ylims["throughput"][0] == 0  # from zero
    assert ylims["accuracy"][0] < -5  # the change in points shows the 6-point drop
    md = files["md"].read_text()
    assert md.index("## Verdict") < md.index("## Machine") < md.index("## Against fp32")
    assert "| speedup over fp32 by batch |" in md.replace("Quant_Mode ", "")
    assert "## Sample top-5" in md and "![](plots/thumbs/0.jpg)" in md and "tabby 0.900" in md
    # the byte-identical build is not a column of the sample table
    sample = md[md.index("## Sample top-5") :]
    assert "qint8_mixed_float16" not in sample.splitlines()[2]
    page = files["html"].read_text()
    assert page.index("Verdict") < page.index("Machine")
    assert "<b>qint8_mixed_float32</b>" in page and 'src="data:image/jpeg;base64,' in page
    from PIL import Image

    assert Image.open(tmp_path / "out" / "plots" / "thumbs" / "0.jpg").size == (128, 128)


def test_a_build_without_accuracy_is_not_in_the_verdict_when_others_have_it(
    tmp_path: Path,
) -> None:
    doc = full_doc(tmp_path)
    doc.accuracy = [a for a in doc.accuracy if a.precision != "qint8_mixed_float32"]
    v = report.verdict(doc)
    assert v.batches["8"].fastest == "force_bfloat16"  # INT8's accuracy is unknown
    doc.accuracy = []  # nothing measured: every build passed its fidelity gate
    doc.verdict = report.verdict(doc)
    assert not doc.verdict.accuracy_measured and doc.verdict.batches["8"].fastest == "lossy"
    assert "passed its build's fidelity gate" in report.verdict_lines(doc)[0]


def test_verdict_never_a_build_slower_than_fp32() -> None:
    """fp16 is inside fp32's noise but slower, and more accurate by chance: the verdict is
    fp32, not the slower build; without accuracy figures the same holds."""
    perf = [
        perf_result("force_float32", 8, [100, 104, 96, 100]),
        perf_result("force_float16", 8, [97, 101, 93, 97]),
    ]
    builds = {p: build(p, p[-2:], 1.0) for p in ("force_float32", "force_float16")}
    doc = job(perf, builds=builds)
    assert doc.verdict.batches["8"].fastest == "force_float32"
    doc.accuracy = [accuracy("force_float32", 0.80), accuracy("force_float16", 0.81)]
    v = report.verdict(doc).batches["8"]
    assert v.fastest == "force_float32" and v.tied_with == []
