"""The report's data and text: stability warnings, verdict, comparison columns (no real run:
figures are injected)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quench import report


def perf_result(precision: str, batch: int, rounds: list[float], warnings=()) -> dict[str, Any]:
    from quench.stats import spread

    qps = sum(rounds) / len(rounds)
    return {
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
    }


def job(perf: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    steps = [
        {"id": f"perf:{r['precision']}:{r['batch']}", "kind": "perf", "precision": r["precision"],
         "status": "ok", "seconds": 1.0, "message": "", "result": {"results": [r]}}
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
    assert doc["stability"]["unstable"] is True
    assert doc["stability"]["warnings"] == ["batch 8 throughput: varied 33%"]
    files = report.write(doc, tmp_path, plots=False)
    md = files["md"].read_text()
    assert "> **Warning:** the speed figures below are unstable" in md
    assert "90.00!" in md  # the unstable figure is marked
    assert "class='warning'" in files["html"].read_text()
    quiet = job([perf_result("force_float32", 1, [100, 101, 99])])
    assert quiet["stability"]["unstable"] is False
    assert "Warning" not in report.markdown(quiet, {}, tmp_path)
