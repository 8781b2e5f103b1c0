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


@dataclass
class JobRecord:
    """What a job hands to its report, as plain data (``quench.run`` fills it in).

    ``steps``: one dict per step (``id``, ``kind``, ``precision``, ``status`` ok | reused |
    failed | skipped, ``seconds``, ``message``, ``result``); ``builds``: precision -> the
    build step's result.
    """

    options: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    builds: dict[str, dict[str, Any]] = field(default_factory=dict)
    precisions: list[str] = field(default_factory=list)


ACC_COLUMNS = ("Model", "Quant_Mode", "Batch_Size", "TOP1", "TOP5")
BUILD_COLUMNS = (
    "Quant_Mode",
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
    return {
        "quench_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": json.loads(json.dumps(job.options, default=str)),
        "model": next((s["result"] for s in steps if s["kind"] == "model" and s["result"]), None),
        "precisions": list(job.precisions),
        "builds": [{"precision": p, **b} for p, b in job.builds.items()],
        "accuracy": [s["result"] for s in done if s["kind"] == "eval"],
        "perf": perf,
        "stability": stability(perf),
        "classify": {
            s["precision"] or "": s["result"]["predictions"]
            for s in done
            if s["kind"] == "classify"
        },
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


def perf_rows(doc: dict[str, Any]) -> list[list[str]]:
    return [perf_row(r) for r in doc["perf"]]


def acc_rows(doc: dict[str, Any]) -> list[list[str]]:
    return [
        [a["model"], a["precision"], str(a["batch"]), f"{a['top1']:.4f}", f"{a['top5']:.4f}"]
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
            f"{b['engine']} {b.get('engine_version', '')}".strip(),
            str(b.get("computes") or "-"),
            fidelity_text(b.get("fidelity")),
            f"{b['build_seconds']:.1f}",
            f"{b['size_bytes'] / 1e6:.2f}",
        ]
        for b in doc["builds"]
    ]


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


def _sections(doc: dict[str, Any]) -> list[tuple[str, tuple[str, ...] | list[str], list[list]]]:
    return [
        ("Performance", PERF_COLUMNS, perf_rows(doc)),
        ("Accuracy", ACC_COLUMNS, acc_rows(doc)),
        ("Builds", BUILD_COLUMNS, build_rows(doc)),
        ("Steps", ("step", "status", "seconds", "message"), step_rows(doc)),
    ]


def markdown(doc: dict[str, Any], plot_files: dict[str, Path], out: Path) -> str:
    parts = [f"# quench run report\n\n{doc['created']}, quench {doc['quench_version']}\n"]
    parts.append("## Machine\n\n" + "\n".join(f"- {line}" for line in machine_lines(doc)) + "\n")
    if doc.get("model"):
        parts.append(f"Model: `{doc['model']['path']}` (sha256 `{doc['model']['sha256']}`)\n")
    for line in unstable_lines(doc):
        parts.append(f"> **Warning:** {line}\n")
    if doc["failed"]:
        parts.append(
            "## Failed steps\n\n"
            + "\n".join(f"- **{f['step']}**: {f['error']}" for f in doc["failed"])
            + "\n"
        )
    for title, cols, rows in _sections(doc):
        parts.append(f"## {title}\n\n" + (_md_table(cols, rows) if rows else "_none_") + "\n")
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
    for line in unstable_lines(doc):
        parts.append(f"<p class='warning'><b>Warning:</b> {e(line)}</p>")
    if doc["failed"]:
        parts.append("<h2 class='failed'>Failed steps</h2><ul>")
        parts += [
            f"<li class='failed'><b>{e(f['step'])}</b>: {e(f['error'])}</li>" for f in doc["failed"]
        ]
        parts.append("</ul>")
    for title, cols, rows in _sections(doc):
        parts.append(f"<h2>{e(title)}</h2>")
        parts.append(_html_table(cols, rows) if rows else "<p><i>none</i></p>")
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
