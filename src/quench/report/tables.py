"""The report's tables and lines as text cells, from the typed document (no markup: the
renderers add it)."""

from __future__ import annotations

from typing import Any

from quench.perf import PERF_COLUMNS, perf_row
from quench.report.compare import REFERENCE, versus_fp32
from quench.report.document import ReportDoc, Speedup

ACC_COLUMNS = ("Model", "Quant_Mode", "Batch_Size", "TOP1", "TOP5", "TOP1 vs fp32", "TOP5 vs fp32")
REPORT_PERF_COLUMNS = (*PERF_COLUMNS, "vs fp32")
VERSUS_COLUMNS = ("Quant_Mode", "speedup over fp32 by batch", "top-1 change vs fp32")
STEP_COLUMNS = ("step", "status", "seconds", "message")
SYNTHETIC_LINE = (
    "INT8 rows marked (synthetic calibration) were calibrated on deterministic synthetic images "
    "(no photos found): their speed is real; for INT8 accuracy, calibrate on photos "
    "(`quench fetch imagenet-sample`, or --calib-images)."
)
BUILD_COLUMNS = (
    "Quant_Mode",
    "calibrated on",
    "engine",
    "computes",
    "fidelity vs fp32 (checked at build)",
    "build time (s)",
    "artifact size (MB)",
)


def verdict_lines(doc: ReportDoc) -> list[str]:
    """One line per batch size (the build's name in Markdown **bold**)."""
    v = doc.verdict
    if v is None or not v.batches:
        return ["no speed figures: no verdict"]
    bound = (
        f"within {v.max_top1_drop_points:g} top-1 point of fp32"
        if v.accuracy_measured
        else "that passed its build's fidelity gate (accuracy not measured)"
    )
    lines = []
    for batch, x in v.batches.items():
        text = f"batch {batch}: the fastest build {bound} is **{x.fastest}**, {x.qps:.1f} qps"
        if x.speedup is not None:
            text += f", {x.speedup:.2f}x fp32"
        if x.top1_change_points is not None:
            text += f", top-1 {x.top1_change_points:+.2f} points"
        if x.tied_with:
            text += (
                f" (a tie within the noise with {', '.join(x.tied_with)}: kept the more accurate)"
            )
        if x.unstable:
            text += " (unstable figures)"
        lines.append(text)
    return lines


def synthetic_calibration(doc: ReportDoc) -> set[str]:
    """The precisions whose build calibrated on synthetic images."""
    return {b.precision for b in doc.builds if b.build.calibration == "synthetic"}


def _mode(precision: str, synthetic: set[str]) -> str:
    return f"{precision} (synthetic calibration)" if precision in synthetic else precision


def _speedup_text(s: Speedup) -> str:
    """One speedup over fp32, as the "Against fp32" table and the perf table both show it."""
    return f"{s.ratio:.2f}x" + ("" if s.beyond_noise else " (tie)")


def perf_rows(doc: ReportDoc) -> list[list[str]]:
    """The perf table, with throughput relative to fp32 at the same batch size (the same
    noise-aware figure as the "Against fp32" table)."""
    synthetic = synthetic_calibration(doc)
    speedup = {
        (v.precision, b): s
        for v in doc.versus_fp32 or versus_fp32(doc)
        for b, s in v.speedup.items()
    }
    rows = []
    for r in doc.perf:
        row = perf_row(r.to_dict())
        row[1] = _mode(r.precision, synthetic)
        s = speedup.get((r.precision, str(r.batch)))
        cell = "1.00x" if r.precision == REFERENCE else _speedup_text(s) if s else "-"
        rows.append([*row, cell])
    return rows


def _points(value: float, ref: float | None) -> str:
    return "-" if ref is None else f"{(value - ref) * 100:+.2f} pt"


def acc_rows(doc: ReportDoc) -> list[list[str]]:
    """The accuracy table, with the change in top-1/top-5 against fp32 in percentage points."""
    ref = next((a for a in doc.accuracy if a.precision == REFERENCE), None)
    synthetic = synthetic_calibration(doc)
    return [
        [
            a.model,
            _mode(a.precision, synthetic),
            str(a.batch),
            f"{a.top1:.4f}",
            f"{a.top5:.4f}",
            _points(a.top1, ref and ref.top1),
            _points(a.top5, ref and ref.top5),
        ]
        for a in doc.accuracy
    ]


def fidelity_text(f: dict[str, Any] | None) -> str:
    """A build's fidelity figures in one cell: top-1 agreement and output SQNR vs fp32."""
    if not f:
        return "-"
    sqnr = f["sqnr_db"]
    return (
        f"top-1 agreement {f['top1_agreement']:.1%}, SQNR "
        + ("exact" if sqnr >= 300 else f"{sqnr:.1f} dB")
        + f" ({f['images']} {f['source']})"
    )


def versus_rows(doc: ReportDoc) -> list[list[str]]:
    rows = []
    for v in doc.versus_fp32:
        if v.same_as:
            rows.append([v.precision, f"same artifact as {v.same_as}", ""])
            continue
        speed = ", ".join(f"b{b}: {_speedup_text(s)}" for b, s in v.speedup.items())
        if v.precision == REFERENCE:
            speed = "the reference"
        top1 = v.top1_change_points
        rows.append([v.precision, speed or "-", "-" if top1 is None else f"{top1:+.2f} points"])
    return rows


def _calibrated_on(source: str | None) -> str:
    if source == "synthetic":
        return "synthetic images (speed only)"
    return source or "-"


def build_rows(doc: ReportDoc) -> list[list[str]]:
    return [
        [
            b.precision + (f" (same artifact as {b.same_as})" if b.same_as else ""),
            _calibrated_on(b.build.calibration),
            f"{b.build.engine} {b.build.engine_version}".strip(),
            str(b.build.computes or "-"),
            fidelity_text(b.build.fidelity),
            f"{b.build.build_seconds:.1f}",
            f"{b.build.size_bytes / 1e6:.2f}",
        ]
        for b in doc.builds
    ]


def step_rows(doc: ReportDoc) -> list[list[str]]:
    return [[s.id, s.status, f"{s.seconds:.1f}", s.message or ""] for s in doc.steps]


def _clock_how(m: dict[str, Any]) -> str:
    """How the clock share-of-peak figures use was found (older reports: not recorded)."""
    c = m.get("clock")
    return f" ({c['source']}: {c['how']})" if isinstance(c, dict) else ""


def machine_lines(doc: ReportDoc) -> list[str]:
    m = doc.machine
    eng = ", ".join(f"{k} {v}" for k, v in m["engines"].items() if v) or "none"
    return [
        f"CPU: {m.get('model')} ({m.get('vendor') or '?'}, {m.get('machine')})",
        f"ISA flags: {', '.join(m.get('flags') or []) or 'none of interest'}",
        f"cores: {m.get('cores')}, clock: {m.get('clock_ghz')} GHz{_clock_how(m)}",
        f"engines: {eng}; quench {m.get('quench')}",
    ]


def unstable_lines(doc: ReportDoc) -> list[str]:
    """The report's warning banner: the speed figures were measured on a busy or noisy
    machine (a ``!`` after a qps marks the figure)."""
    if not doc.stability.unstable:
        return []
    return [
        "the speed figures below are unstable (marked !): repeat `quench run --force` on a "
        "quiet machine before relying on them",
        *doc.stability.warnings,
    ]


def sample_rows(doc: ReportDoc) -> tuple[list[str], list[tuple[str, list[list[str]]]]]:
    """The sample images' top-5 per build (byte-identical builds once): the build columns,
    and per image its file and each build's top-5 lines."""
    same = {b.precision for b in doc.builds if b.same_as}
    precs = [p for p in doc.classify if p not in same]
    by_file: dict[str, dict[str, Any]] = {}
    for p in precs:
        for pred in doc.classify[p]:
            by_file.setdefault(pred.source, {})[p] = pred
    rows = []
    for f, preds in by_file.items():
        cells = []
        for p in precs:
            pred = preds.get(p)
            if pred is None:
                cells.append(["-"])
            elif pred.error is not None:
                cells.append([f"error: {pred.error}"])
            else:
                cells.append([f"{n} {s:.3f}" for n, s in zip(pred.names, pred.scores, strict=True)])
        rows.append((f, cells))
    return precs, rows
