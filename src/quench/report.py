"""The ``quench run`` report: ``report.json`` (every figure), ``report.md``, a self-contained
``report.html`` (plots embedded as base64 PNG) and the PNG plots themselves."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from quench import __version__
from quench.hw import cpu_info
from quench.perf import PERF_COLUMNS, perf_row
from quench.precision import FORCE_FLOAT32
from quench.stats import RULE, compare

FP32 = FORCE_FLOAT32.name
MAX_TOP1_DROP = 1.0  # percentage points: the verdict's accuracy bound against fp32
THUMB = 128  # sample thumbnails: square tiles, the image fitted inside


@dataclass
class JobRecord:
    """What a job hands to its report, as plain data (``quench.run`` fills it in).

    ``steps``: one dict per step (``id``, ``kind``, ``precision``, ``status`` ok | reused |
    failed | skipped, ``seconds``, ``message``, ``result``); ``builds``: precision -> the
    build step's result; ``data``: where calibration and evaluation images came from
    (``calibration``: --calib-images | ImageNet sample | synthetic) and ``accuracy_note``, the
    line saying why accuracy was not measured and how to get it.
    """

    options: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    builds: dict[str, dict[str, Any]] = field(default_factory=dict)
    precisions: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


REFERENCE = FP32  # the "vs fp32" columns compare with this precision
ACC_COLUMNS = ("Model", "Quant_Mode", "Batch_Size", "TOP1", "TOP5", "TOP1 vs fp32", "TOP5 vs fp32")
REPORT_PERF_COLUMNS = (*PERF_COLUMNS, "vs fp32")
VERSUS_COLUMNS = ("Quant_Mode", "speedup over fp32 by batch", "top-1 change vs fp32")
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


def engine_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("onnxruntime", "openvino"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict[str, Any]:
    return {**cpu_info(), "engines": engine_versions(), "quench": __version__}


def stability(perf: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the speed figures are trustworthy: every warning of every perf result."""
    warnings = list(dict.fromkeys(w for r in perf for w in r.get("warnings", [])))
    loads = [r["machine_load"] for r in perf if r.get("machine_load")]
    return {
        "unstable": bool(warnings),
        "warnings": warnings,
        "max_other_cores": max((x["other_cores"] for x in loads), default=None),
    }


def collect(job: JobRecord) -> dict[str, Any]:
    """Every figure of the job, as plain JSON data."""
    steps = job.steps
    done = [s for s in steps if s["status"] in ("ok", "reused")]
    perf = [r for s in done if s["kind"] == "perf" for r in s["result"]["results"]]
    builds = [{"precision": p, **b} for p, b in job.builds.items()]
    first_of: dict[str, str] = {}
    for b in builds:  # byte-identical artifacts: shown once, the later ones point back
        sha = b.get("sha256")
        if sha and sha in first_of:
            b["same_as"] = first_of[sha]
        elif sha:
            first_of[sha] = b["precision"]
    doc = {
        "quench_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": json.loads(json.dumps(job.options, default=str)),
        "model": next((s["result"] for s in steps if s["kind"] == "model" and s["result"]), None),
        "precisions": list(job.precisions),
        "builds": builds,
        "accuracy": [s["result"] for s in done if s["kind"] == "eval"],
        "perf": perf,
        "stability": stability(perf),
        "classify": {
            s["precision"] or "": s["result"]["predictions"]
            for s in done
            if s["kind"] == "classify"
        },
        "data": dict(job.data),
        "notes": list(job.notes),
        "steps": [{k: v for k, v in s.items() if k != "result"} for s in steps],
        "failed": [
            {"step": s["id"], "error": s["message"]} for s in steps if s["status"] == "failed"
        ],
        "skipped": [
            {"step": s["id"], "why": s["message"]} for s in steps if s["status"] == "skipped"
        ],
    }
    doc["versus_fp32"] = versus_fp32(doc)
    doc["verdict"] = verdict(doc)
    return doc


# -- comparisons ---------------------------------------------------------------------------------


def _rounds(r: dict[str, Any]) -> list[float]:
    return [x["qps"] for x in r.get("rounds", [])] or [r["qps"]]


def _top1(doc: dict[str, Any]) -> dict[str, float]:
    return {a["precision"]: a["top1"] for a in doc["accuracy"]}


def versus_fp32(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each build against fp32: speedup per batch size (a tie when inside the noise of the
    two runs' rounds) and top-1 change in percentage points."""
    perf = {(r["precision"], r["batch"]): r for r in doc["perf"]}
    top1 = _top1(doc)
    rows = []
    for b in doc["builds"]:
        p = b["precision"]
        row: dict[str, Any] = {"precision": p, "speedup": {}, "same_as": b.get("same_as")}
        for (prec, batch), r in sorted(perf.items(), key=lambda kv: kv[0][1]):
            base = perf.get((FP32, batch))
            if prec != p or base is None:
                continue
            c = compare(_rounds(r), _rounds(base))
            row["speedup"][str(batch)] = {
                "ratio": round(r["qps"] / base["qps"], 3),
                "beyond_noise": c.winner != "tie",
            }
        if p in top1 and FP32 in top1:
            row["top1_change_points"] = round((top1[p] - top1[FP32]) * 100, 2)
        rows.append(row)
    return rows


def verdict(doc: dict[str, Any], max_drop: float = MAX_TOP1_DROP) -> dict[str, Any]:
    """The fastest build within ``max_drop`` top-1 points of fp32 at each batch size, never one
    slower than fp32 there. Builds whose speed differs by less than the noise are a tie, broken
    by accuracy (the higher top-1, else the higher fidelity agreement, else the earlier
    build)."""
    top1 = _top1(doc)
    order = [b["precision"] for b in doc["builds"]]
    agreement = {
        b["precision"]: (b.get("fidelity") or {}).get("top1_agreement", 1.0) for b in doc["builds"]
    }
    measured = FP32 in top1

    def within(p: str) -> bool:
        if not measured:
            return True  # no accuracy figures: every build passed its fidelity gate
        if p not in top1:
            return False  # its accuracy was not measured (failed or skipped): not verified
        return (top1[FP32] - top1[p]) * 100 <= max_drop + 1e-9

    out: dict[str, Any] = {
        "max_top1_drop_points": max_drop,
        "accuracy_measured": measured,
        "rule": f"{RULE}; a tie goes to the more accurate build",
        "batches": {},
    }
    perf = [r for r in doc["perf"] if r["precision"] in order]
    for batch in sorted({r["batch"] for r in perf}):
        fp32 = next(
            (r for r in doc["perf"] if r["precision"] == FP32 and r["batch"] == batch), None
        )
        # never a build slower than fp32: fp32 itself is the better choice then
        rs = [
            r
            for r in perf
            if r["batch"] == batch
            and within(r["precision"])
            and (fp32 is None or r is fp32 or r["qps"] >= fp32["qps"])
        ]
        if not rs:
            continue
        lead = max(rs, key=lambda r: r["qps"])
        tied = [r for r in rs if compare(_rounds(lead), _rounds(r)).winner == "tie"]
        best = max(
            tied or [lead],
            key=lambda r: (
                top1.get(r["precision"], 0.0),
                agreement[r["precision"]],
                -order.index(r["precision"]),
            ),
        )
        out["batches"][str(batch)] = {
            "fastest": best["precision"],
            "qps": best["qps"],
            "speedup": round(best["qps"] / fp32["qps"], 3) if fp32 else None,
            "tied_with": [r["precision"] for r in tied if r is not best],
            "top1_change_points": (
                round((top1[best["precision"]] - top1[FP32]) * 100, 2)
                if measured and best["precision"] in top1
                else None
            ),
            "unstable": bool(best.get("warnings")),
        }
    return out


def verdict_lines(doc: dict[str, Any]) -> list[str]:
    v = doc.get("verdict") or {}
    if not v.get("batches"):
        return ["no speed figures: no verdict"]
    bound = (
        f"within {v['max_top1_drop_points']:g} top-1 point of fp32"
        if v["accuracy_measured"]
        else "that passed its build's fidelity gate (accuracy not measured)"
    )
    lines = []
    for batch, x in v["batches"].items():
        text = f"batch {batch}: the fastest build {bound} is **{x['fastest']}**, {x['qps']:.1f} qps"
        if x["speedup"] is not None:
            text += f", {x['speedup']:.2f}x fp32"
        if x["top1_change_points"] is not None:
            text += f", top-1 {x['top1_change_points']:+.2f} points"
        if x["tied_with"]:
            text += (
                f" (a tie within the noise with {', '.join(x['tied_with'])}: kept the more "
                "accurate)"
            )
        if x["unstable"]:
            text += " (unstable figures)"
        lines.append(text)
    return lines


# -- tables ------------------------------------------------------------------------------------


def synthetic_calibration(doc: dict[str, Any]) -> set[str]:
    """The precisions whose build calibrated on synthetic images."""
    return {b["precision"] for b in doc["builds"] if b.get("calibration") == "synthetic"}


def _mode(precision: str, synthetic: set[str]) -> str:
    return f"{precision} (synthetic calibration)" if precision in synthetic else precision


def _speedup_text(s: dict[str, Any]) -> str:
    """One speedup over fp32, as the "Against fp32" table and the perf table both show it."""
    return f"{s['ratio']:.2f}x" + ("" if s["beyond_noise"] else " (tie)")


def perf_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The perf table, with throughput relative to fp32 at the same batch size (the same
    noise-aware figure as the "Against fp32" table)."""
    synthetic = synthetic_calibration(doc)
    speedup = {
        (v["precision"], b): s
        for v in doc.get("versus_fp32") or versus_fp32(doc)
        for b, s in v["speedup"].items()
    }
    rows = []
    for r in doc["perf"]:
        row = perf_row(r)
        row[1] = _mode(r["precision"], synthetic)
        s = speedup.get((r["precision"], str(r["batch"])))
        cell = "1.00x" if r["precision"] == REFERENCE else _speedup_text(s) if s else "-"
        rows.append([*row, cell])
    return rows


def _points(value: float, ref: float | None) -> str:
    return "-" if ref is None else f"{(value - ref) * 100:+.2f} pt"


def acc_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The accuracy table, with the change in top-1/top-5 against fp32 in percentage points."""
    ref = next((a for a in doc["accuracy"] if a["precision"] == REFERENCE), None)
    synthetic = synthetic_calibration(doc)
    return [
        [
            a["model"],
            _mode(a["precision"], synthetic),
            str(a["batch"]),
            f"{a['top1']:.4f}",
            f"{a['top5']:.4f}",
            _points(a["top1"], ref and ref["top1"]),
            _points(a["top5"], ref and ref["top5"]),
        ]
        for a in doc["accuracy"]
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


def versus_rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = []
    for v in doc.get("versus_fp32", []):
        if v.get("same_as"):
            rows.append([v["precision"], f"same artifact as {v['same_as']}", ""])
            continue
        speed = ", ".join(f"b{b}: {_speedup_text(s)}" for b, s in v["speedup"].items())
        if v["precision"] == REFERENCE:
            speed = "the reference"
        top1 = v.get("top1_change_points")
        rows.append([v["precision"], speed or "-", "-" if top1 is None else f"{top1:+.2f} points"])
    return rows


def build_rows(doc: dict[str, Any]) -> list[list[str]]:
    return [
        [
            b["precision"] + (f" (same artifact as {b['same_as']})" if b.get("same_as") else ""),
            _calibrated_on(b.get("calibration")),
            f"{b['engine']} {b.get('engine_version', '')}".strip(),
            str(b.get("computes") or "-"),
            fidelity_text(b.get("fidelity")),
            f"{b['build_seconds']:.1f}",
            f"{b['size_bytes'] / 1e6:.2f}",
        ]
        for b in doc["builds"]
    ]


def _calibrated_on(source: str | None) -> str:
    if source == "synthetic":
        return "synthetic images (speed only)"
    return source or "-"


def step_rows(doc: dict[str, Any]) -> list[list[str]]:
    return [[s["id"], s["status"], f"{s['seconds']:.1f}", s["message"] or ""] for s in doc["steps"]]


def _clock_how(m: dict[str, Any]) -> str:
    """How the clock share-of-peak figures use was found (older reports: not recorded)."""
    c = m.get("clock")
    return f" ({c['source']}: {c['how']})" if isinstance(c, dict) else ""


def machine_lines(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    eng = ", ".join(f"{k} {v}" for k, v in m["engines"].items() if v) or "none"
    return [
        f"CPU: {m.get('model')} ({m.get('vendor') or '?'}, {m.get('machine')})",
        f"ISA flags: {', '.join(m.get('flags') or []) or 'none of interest'}",
        f"cores: {m.get('cores')}, clock: {m.get('clock_ghz')} GHz{_clock_how(m)}",
        f"engines: {eng}; quench {m.get('quench')}",
    ]


def unstable_lines(doc: dict[str, Any]) -> list[str]:
    """The report's warning banner: the speed figures were measured on a busy or noisy
    machine (a ``!`` after a qps marks the figure)."""
    st = doc.get("stability") or {}
    if not st.get("unstable"):
        return []
    return [
        "the speed figures below are unstable (marked !): repeat `quench run --force` on a "
        "quiet machine before relying on them",
        *st["warnings"],
    ]


# -- plots -------------------------------------------------------------------------------------


def make_plots(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    """PNG plots (matplotlib figures drawn by Agg, without pyplot: the host process's
    matplotlib backend is left as it was); returns name -> file."""

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    by_prec: dict[str, list[dict[str, Any]]] = {}
    for r in doc["perf"]:
        by_prec.setdefault(r["precision"], []).append(r)

    if by_prec:
        fig, ax = _figure(6.4)
        for prec, rs in by_prec.items():
            rs = sorted(rs, key=lambda r: r["batch"])
            # the bars span the rounds' min to max qps: the measured noise
            low = [r["qps"] - (r.get("qps_spread") or {}).get("min", r["qps"]) for r in rs]
            high = [(r.get("qps_spread") or {}).get("max", r["qps"]) - r["qps"] for r in rs]
            ax.errorbar(
                [r["batch"] for r in rs],
                [r["qps"] for r in rs],
                yerr=[[max(0.0, x) for x in low], [max(0.0, x) for x in high]],
                marker="o",
                capsize=3,
                label=prec,
            )
        ax.set_xticks(sorted({r["batch"] for r in doc["perf"]}))
        ax.set_xlabel("batch size")
        ax.set_ylabel("throughput (images/s)")
        ax.set_ylim(bottom=0)
        ax.set_title("Throughput vs batch size (bars: min-max of the rounds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        files["throughput"] = _save(fig, out / "throughput.png")

        rows = [r for rs in by_prec.values() for r in sorted(rs, key=lambda r: r["batch"])]
        fig, ax = _figure(max(6.4, 0.7 * len(rows) + 2))
        width = 0.27
        xs = range(len(rows))
        for i, p in enumerate(("p50", "p90", "p99")):
            ax.bar(
                [x + (i - 1) * width for x in xs],
                [r["latency_ms"][p] for r in rows],
                width,
                label=p,
            )
        ax.set_xticks(list(xs))
        ax.set_xticklabels(
            [f"{r['precision']}\nb{r['batch']}" for r in rows], fontsize=7, rotation=30
        )
        ax.set_ylabel("latency per batch (ms)")
        ax.set_title("Latency p50 / p90 / p99")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        files["latency"] = _save(fig, out / "latency.png")

    if doc["accuracy"]:
        acc = doc["accuracy"]
        base = next((a for a in acc if a["precision"] == FP32), None)
        fig, ax = _figure(max(6.4, 1.2 * len(acc) + 2))
        xs = range(len(acc))
        if base is not None:  # the change in points: a 0-1 axis would hide a 6-point drop
            for i, key in enumerate(("top1", "top5")):
                ax.bar(
                    [x + (i - 0.5) * 0.4 for x in xs],
                    [(a[key] - base[key]) * 100 for a in acc],
                    0.4,
                    label=key.replace("top", "top-"),
                )
            ax.axhline(0, color="black", linewidth=0.8)
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(lo, -1.0), max(hi, 1.0))  # at least +-1 point: no magnified noise
            ax.set_ylabel("change vs fp32 (percentage points)")
            ax.set_title("Accuracy change against fp32")
        else:
            ax.bar([x - 0.2 for x in xs], [a["top1"] for a in acc], 0.4, label="top-1")
            ax.bar([x + 0.2 for x in xs], [a["top5"] for a in acc], 0.4, label="top-5")
            ax.set_ylabel("accuracy")
            ax.set_title("Accuracy per precision")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([a["precision"] for a in acc], fontsize=8, rotation=20)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        files["accuracy"] = _save(fig, out / "accuracy.png")
    return files


def make_thumbnails(doc: dict[str, Any], out: Path) -> dict[str, Path]:
    """A small JPEG tile of each sample image the job classified: file -> thumbnail."""
    from PIL import Image, ImageOps

    files: dict[str, Path] = {}
    sources = dict.fromkeys(p["file"] for preds in doc["classify"].values() for p in preds)
    for i, src in enumerate(sources):
        try:
            with Image.open(src) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                tile = ImageOps.pad(im, (THUMB, THUMB), color=(240, 240, 240))  # same-size tiles
                out.mkdir(parents=True, exist_ok=True)
                path = out / f"{i}.jpg"
                tile.save(path, "JPEG", quality=85)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # the table still shows the predictions, without a picture
        files[src] = path
    return files


def sample_rows(doc: dict[str, Any]) -> tuple[list[str], list[tuple[str, list[list[str]]]]]:
    """The sample images' top-5 per build (byte-identical builds once): the build columns,
    and per image its file and each build's top-5 lines."""
    same = {b["precision"] for b in doc["builds"] if b.get("same_as")}
    precs = [p for p in doc["classify"] if p not in same]
    by_file: dict[str, dict[str, dict[str, Any]]] = {}
    for p in precs:
        for pred in doc["classify"][p]:
            by_file.setdefault(pred["file"], {})[p] = pred
    rows = []
    for f, preds in by_file.items():
        cells = []
        for p in precs:
            pred = preds.get(p)
            if pred is None:
                cells.append(["-"])
            elif "error" in pred:
                cells.append([f"error: {pred['error']}"])
            else:
                cells.append([f"{t['name']} {t['score']:.3f}" for t in pred["top"]])
        rows.append((f, cells))
    return precs, rows


def _figure(width: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


# -- writers -----------------------------------------------------------------------------------


def _md_table(cols: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    def cell(v: str) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


Section = tuple[str, tuple[str, ...] | list[str], list[list[str]], str]


def _sections(doc: dict[str, Any]) -> list[Section]:
    """(title, columns, rows, a line under the table)."""
    data = doc.get("data") or {}
    return [
        ("Against fp32", VERSUS_COLUMNS, versus_rows(doc), ""),
        (
            "Performance",
            REPORT_PERF_COLUMNS,
            perf_rows(doc),
            SYNTHETIC_LINE if synthetic_calibration(doc) else "",
        ),
        ("Accuracy", ACC_COLUMNS, acc_rows(doc), data.get("accuracy_note") or ""),
        ("Builds", BUILD_COLUMNS, build_rows(doc), ""),
        ("Steps", ("step", "status", "seconds", "message"), step_rows(doc), ""),
    ]


def markdown(
    doc: dict[str, Any],
    plot_files: dict[str, Path],
    out: Path,
    thumbs: dict[str, Path] | None = None,
) -> str:
    parts = [f"# quench run report\n\n{doc['created']}, quench {doc['quench_version']}\n"]
    parts.append("## Verdict\n\n" + "\n".join(f"- {line}" for line in verdict_lines(doc)) + "\n")
    parts.append("## Machine\n\n" + "\n".join(f"- {line}" for line in machine_lines(doc)) + "\n")
    if doc.get("model"):
        parts.append(f"Model: `{doc['model']['path']}` (sha256 `{doc['model']['sha256']}`)\n")
    warn = unstable_lines(doc)
    if warn:
        parts.append(
            f"> **Warning:** {warn[0]}\n>\n" + "\n".join(f"> - {w}" for w in warn[1:]) + "\n"
        )
    if doc["failed"]:
        parts.append(
            "## Failed steps\n\n"
            + "\n".join(f"- **{f['step']}**: {f['error']}" for f in doc["failed"])
            + "\n"
        )
    for title, cols, rows, line in _sections(doc):
        table = _md_table(cols, rows) if rows else "_none_"
        parts.append(f"## {title}\n\n{table}\n" + (f"\n{line}\n" if line else ""))
    precs, samples = sample_rows(doc)
    if samples:
        rows = []
        for f, cells in samples:
            pic = (
                f"![]({thumbs[f].relative_to(out).as_posix()})<br>"
                if thumbs and f in thumbs
                else ""
            )
            rows.append([pic + Path(f).name, *("<br>".join(c) for c in cells)])
        parts.append("## Sample top-5\n\n" + _md_table(["image", *precs], rows) + "\n")
    if doc["notes"]:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in doc["notes"]) + "\n")
    if plot_files:
        parts.append(
            "## Plots\n\n"
            + "\n\n".join(f"![{k}]({p.relative_to(out).as_posix()})" for k, p in plot_files.items())
            + "\n"
        )
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:4px 8px;font-size:14px}
th{background:#f0f0f0}td.n{text-align:right}
.failed{color:#b00}.machine li{font-family:monospace}
.warning{background:#fff3cd;border:1px solid #e0b000;padding:6px 10px}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}img.thumb{margin:0}
"""


def _html_table(cols: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"n" if _numeric(c) else ""}">{html.escape(str(c))}</td>' for c in r)
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _bold(escaped: str) -> str:
    """Markdown's **bold** in an already escaped line, as <b>."""
    parts = escaped.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _numeric(text: str) -> bool:
    try:
        float(str(text).rstrip("%"))
        return True
    except ValueError:
        return False


def html_report(
    doc: dict[str, Any], plot_files: dict[str, Path], thumbs: dict[str, Path] | None = None
) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>quench run report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>quench run report</h1>",
        f"<p>{e(doc['created'])}, quench {e(doc['quench_version'])}</p>",
        "<h2>Verdict</h2><ul>",
        *(f"<li>{_bold(e(line))}</li>" for line in verdict_lines(doc)),
        "</ul>",
        "<h2>Machine</h2><ul class='machine'>",
        *(f"<li>{e(line)}</li>" for line in machine_lines(doc)),
        "</ul>",
    ]
    if doc.get("model"):
        parts.append(
            f"<p>Model: <code>{e(doc['model']['path'])}</code> "
            f"(sha256 <code>{e(doc['model']['sha256'])}</code>)</p>"
        )
    warn = unstable_lines(doc)
    if warn:
        parts.append(f"<div class='warning'><b>Warning:</b> {e(warn[0])}<ul>")
        parts += [f"<li>{e(w)}</li>" for w in warn[1:]]
        parts.append("</ul></div>")
    if doc["failed"]:
        parts.append("<h2 class='failed'>Failed steps</h2><ul>")
        parts += [
            f"<li class='failed'><b>{e(f['step'])}</b>: {e(f['error'])}</li>" for f in doc["failed"]
        ]
        parts.append("</ul>")
    for title, cols, rows, line in _sections(doc):
        parts.append(f"<h2>{e(title)}</h2>")
        parts.append(_html_table(cols, rows) if rows else "<p><i>none</i></p>")
        if line:
            parts.append(f"<p>{e(line)}</p>")
    precs, samples = sample_rows(doc)
    if samples:
        parts.append("<h2>Sample top-5</h2><table><thead><tr><th>image</th>")
        parts += [f"<th>{e(p)}</th>" for p in precs]
        parts.append("</tr></thead><tbody>")
        for f, cells in samples:
            pic = ""
            if thumbs and f in thumbs:
                data = base64.b64encode(thumbs[f].read_bytes()).decode("ascii")
                src = f"data:image/jpeg;base64,{data}"
                pic = f'<img class="thumb" alt="{e(Path(f).name)}" src="{src}"><br>'
            parts.append(f"<tr><td>{pic}{e(Path(f).name)}</td>")
            parts += ["<td>" + "<br>".join(e(x) for x in c) + "</td>" for c in cells]
            parts.append("</tr>")
        parts.append("</tbody></table>")
    if doc["notes"]:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in doc["notes"]))
        parts.append("</ul>")
    if plot_files:
        parts.append("<h2>Plots</h2>")
        for name, path in plot_files.items():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(f'<div><img alt="{e(name)}" src="data:image/png;base64,{data}"></div>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write(doc: dict[str, Any], out: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_files = make_plots(doc, out / "plots") if plots else {}
    thumbs = make_thumbnails(doc, out / "plots" / "thumbs") if plots else {}
    doc["plots"] = {k: p.relative_to(out).as_posix() for k, p in plot_files.items()}
    files = {
        "json": out / "report.json",
        "md": out / "report.md",
        "html": out / "report.html",
    }
    files["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    files["md"].write_text(markdown(doc, plot_files, out, thumbs))
    files["html"].write_text(html_report(doc, plot_files, thumbs))
    return {**files, **{f"plot_{k}": p for k, p in plot_files.items()}}
