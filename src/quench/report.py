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


REFERENCE = FORCE_FLOAT32.name  # the "vs fp32" columns compare with this precision
ACC_COLUMNS = ("Model", "Quant_Mode", "Batch_Size", "TOP1", "TOP5", "TOP1 vs fp32", "TOP5 vs fp32")
REPORT_PERF_COLUMNS = (*PERF_COLUMNS, "vs fp32")
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


def collect(job: JobRecord) -> dict[str, Any]:
    """Every figure of the job, as plain JSON data."""
    steps = job.steps
    done = [s for s in steps if s["status"] in ("ok", "reused")]
    return {
        "quench_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": json.loads(json.dumps(job.options, default=str)),
        "model": next((s["result"] for s in steps if s["kind"] == "model" and s["result"]), None),
        "precisions": list(job.precisions),
        "builds": [{"precision": p, **b} for p, b in job.builds.items()],
        "accuracy": [s["result"] for s in done if s["kind"] == "eval"],
        "perf": [r for s in done if s["kind"] == "perf" for r in s["result"]["results"]],
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


# -- tables ------------------------------------------------------------------------------------


def synthetic_calibration(doc: dict[str, Any]) -> set[str]:
    """The precisions whose build calibrated on synthetic images."""
    return {b["precision"] for b in doc["builds"] if b.get("calibration") == "synthetic"}


def _mode(precision: str, synthetic: set[str]) -> str:
    return f"{precision} (synthetic calibration)" if precision in synthetic else precision


def perf_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The perf table, with throughput relative to fp32 at the same batch size."""
    synthetic = synthetic_calibration(doc)
    ref = {r["batch"]: r["qps"] for r in doc["perf"] if r["precision"] == REFERENCE}
    rows = []
    for r in doc["perf"]:
        row = perf_row(r)
        row[1] = _mode(r["precision"], synthetic)
        base = ref.get(r["batch"])
        rows.append([*row, f"{r['qps'] / base:.2f}x" if base else "-"])
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


def build_rows(doc: dict[str, Any]) -> list[list[str]]:
    return [
        [
            b["precision"],
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


def machine_lines(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    eng = ", ".join(f"{k} {v}" for k, v in m["engines"].items() if v) or "none"
    return [
        f"CPU: {m.get('model')} ({m.get('vendor') or '?'}, {m.get('machine')})",
        f"ISA flags: {', '.join(m.get('flags') or []) or 'none of interest'}",
        f"cores: {m.get('cores')}, clock: {m.get('clock_ghz')} GHz",
        f"engines: {eng}; quench {m.get('quench')}",
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
            ax.plot([r["batch"] for r in rs], [r["qps"] for r in rs], marker="o", label=prec)
        ax.set_xticks(sorted({r["batch"] for r in doc["perf"]}))
        ax.set_xlabel("batch size")
        ax.set_ylabel("throughput (images/s)")
        ax.set_title("Throughput vs batch size")
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
        fig, ax = _figure(max(6.4, 1.2 * len(acc) + 2))
        xs = range(len(acc))
        ax.bar([x - 0.2 for x in xs], [a["top1"] for a in acc], 0.4, label="top-1")
        ax.bar([x + 0.2 for x in xs], [a["top5"] for a in acc], 0.4, label="top-5")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([a["precision"] for a in acc], fontsize=8, rotation=20)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title("Accuracy per precision")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        files["accuracy"] = _save(fig, out / "accuracy.png")
    return files


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


def markdown(doc: dict[str, Any], plot_files: dict[str, Path], out: Path) -> str:
    parts = [f"# quench run report\n\n{doc['created']}, quench {doc['quench_version']}\n"]
    parts.append("## Machine\n\n" + "\n".join(f"- {line}" for line in machine_lines(doc)) + "\n")
    if doc.get("model"):
        parts.append(f"Model: `{doc['model']['path']}` (sha256 `{doc['model']['sha256']}`)\n")
    if doc["failed"]:
        parts.append(
            "## Failed steps\n\n"
            + "\n".join(f"- **{f['step']}**: {f['error']}" for f in doc["failed"])
            + "\n"
        )
    for title, cols, rows, line in _sections(doc):
        table = _md_table(cols, rows) if rows else "_none_"
        parts.append(f"## {title}\n\n{table}\n" + (f"\n{line}\n" if line else ""))
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
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
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


def _numeric(text: str) -> bool:
    try:
        float(str(text).rstrip("%"))
        return True
    except ValueError:
        return False


def html_report(doc: dict[str, Any], plot_files: dict[str, Path]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>quench run report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>quench run report</h1>",
        f"<p>{e(doc['created'])}, quench {e(doc['quench_version'])}</p>",
        "<h2>Machine</h2><ul class='machine'>",
        *(f"<li>{e(line)}</li>" for line in machine_lines(doc)),
        "</ul>",
    ]
    if doc.get("model"):
        parts.append(
            f"<p>Model: <code>{e(doc['model']['path'])}</code> "
            f"(sha256 <code>{e(doc['model']['sha256'])}</code>)</p>"
        )
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
    doc["plots"] = {k: p.relative_to(out).as_posix() for k, p in plot_files.items()}
    files = {
        "json": out / "report.json",
        "md": out / "report.md",
        "html": out / "report.html",
    }
    files["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    files["md"].write_text(markdown(doc, plot_files, out))
    files["html"].write_text(html_report(doc, plot_files))
    return {**files, **{f"plot_{k}": p for k, p in plot_files.items()}}
