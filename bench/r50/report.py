"""bench/run.py's BENCHMARKS.md: one function per section, every figure from this run."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from common import REPO, fmt, pct, rel

from quench.stats import RULE, compare
from r50 import config
from r50.config import FAMILY_TITLE, MEMORY_MODE, Prep, Row
from r50.measure import Bench


def ratio_cell(quench: Row, peer: Row, b: int) -> str:
    """Quench / peer throughput, marked by whether the difference is beyond the rounds' noise."""
    text = f"{quench.qps[b] / peer.qps[b]:.2f}x"
    if not quench.rounds.get(b) or not peer.rounds.get(b):
        return f"{text} (no rounds)"
    c = compare(quench.rounds[b], peer.rounds[b])
    return {"a": f"**{text}**", "b": text, "tie": f"{text} (tie)"}[c.winner]


def family_table(rows: list[Row], batches: list[int]) -> list[str]:
    b0, bmax = min(batches), max(batches)
    peers = [r for r in rows if r.kind == "peer"]
    best = {b: max((r.qps[b] for r in peers if b in r.qps), default=None) for b in batches}
    head = (
        ["Config", "Settings"]
        + [f"qps b={b}" for b in batches]
        + [f"p50 ms b={b0}", f"p99 ms b={b0}"]
        + [f"Quench / best peer b={b}" for b in batches]
        + [f"% of peak b={bmax}"]
    )
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        ratios = []
        for b in batches:
            if r.kind == "quench" and b in r.qps and best[b]:
                ratios.append(ratio_cell(r, next(p for p in peers if p.qps.get(b) == best[b]), b))
            else:
                ratios.append("")
        cells = (
            [f"**{r.label}**" if r.kind == "quench" else r.label, r.settings]
            + [fmt(r.qps.get(b)) for b in batches]
            + [fmt(r.p50.get(b0), 2), fmt(r.p99.get(b0), 2)]
            + ratios
            + [pct(r.peak.get(bmax))]
        )
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    lines.append(
        f"- Quench / best peer: **bold** when Quench is faster beyond the noise, (tie) when the "
        f"difference is inside it ({RULE}; Quench's rounds against the peer's)."
    )
    for b in batches:
        if best[b]:
            who = next(r.label for r in peers if r.qps.get(b) == best[b])
            lines.append(f"- best peer at b={b}: {who}, {best[b]:,.1f} qps")
    for r in rows:
        for e in r.errors:
            lines.append(f"- {r.label}: **failed** {e}")
        for n in r.notes:
            lines.append(f"- {r.label}: {n}")
    return lines


def measured_section(
    title: str,
    intro: str,
    columns: list[str],
    entries: list[dict[str, Any]],
    key: str,
    cells: Callable[[dict[str, Any]], list[str]],
) -> list[str]:
    """A report section: a table with a row per entry (or its error), then the commands."""
    if not entries:
        return []
    out = [f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |"]
    out.append("|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
    for e in entries:
        if "error" in e:
            row = [str(e[key]), f"**failed**: {e['error']}", *[""] * (len(columns) - 2)]
        else:
            row = [str(e[key]), *cells(e)]
        out.append("| " + " | ".join(row) + " |")
    return [*out, "", "```", *[e["command"] for e in entries], "```", ""]


def write_report(b: Bench, machine: list[tuple[str, str]], started: datetime) -> None:
    """BENCHMARKS.md: every section from this run's measurements."""
    titles = {**FAMILY_TITLE, **b.capped_titles}
    out = [
        *report_header(machine, started),
        *family_sections(b, titles),
        *accuracy_section(b.accuracy),
        *magicmind_section(b),
        *serving_section(b.serving),
        *pipeline_section(b.pipeline, b.args.images),
        *memory_section(b.memory),
        *builds_section(b.preps),
        *how_measured(b, titles),
        f"Logs of every command: `{rel(b.work / 'logs')}`.",
    ]
    b.args.out.parent.mkdir(parents=True, exist_ok=True)
    b.args.out.write_text("\n".join(out) + "\n")


def report_header(machine: list[tuple[str, str]], started: datetime) -> list[str]:
    took = (time.perf_counter() - config.T0) / 60
    return [
        "# Benchmarks: ResNet-50 v1, peers vs Quench, CPU",
        "",
        f"Produced {started:%Y-%m-%d %H:%M} UTC by one run of "
        f"`{rel(sys.executable)} {shlex.join(sys.argv)}` "
        f"(cwd {rel(Path.cwd()) if Path.cwd() != REPO else 'repo root'}; took "
        f"{took:.1f} min). Every figure below comes from that run.",
        "",
        "Model: the ResNet-50 v1 replica (`quench zoo synth resnet50-v1-7`): the structure of "
        "the ONNX model zoo's resnet50-v1-7 with synthetic weights, so speeds are "
        "representative, accuracy is not. Input float32 [b,3,224,224].",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine],
        "",
    ]


def family_sections(b: Bench, titles: dict[str, str]) -> list[str]:
    """A table per family (and per capped CPU class), peers then Quench."""
    out: list[str] = []
    for fam in titles:
        frows = [r for r in b.rows if r.family == fam]
        if frows:
            out += [f"## {titles[fam]}", "", *family_table(frows, b.batches), ""]
    return out


def accuracy_section(lines: list[str]) -> list[str]:
    if not lines:
        return []
    return [
        "## INT8 accuracy per CPU class (real weights)",
        "",
        "`bench/accuracy.py`: efficientnet-lite0 and -lite1 (`../shared/models`, real "
        "ImageNet weights), calibrated on `calib.txt` (160 images; 40 held out for the "
        "build's fidelity gate), top-1 on `val.txt` (800 images), OpenVINO engine. Each "
        "artifact is built once on this CPU and evaluated on each class (the caps run "
        "OpenVINO's kernels for that class); drops are against fp32 on the same class.",
        "",
        *lines,
        "",
    ]


def magicmind_section(b: Bench) -> list[str]:
    """Quench's timed rows on this CPU as MagicMind's sample reports them."""
    qrows = [r for r in b.rows if r.kind == "quench" and r.qps and "@" not in r.family]
    if not qrows:
        return []
    out = [
        "## Quench, MagicMind-style",
        "",
        "| Model | Quant_Mode | Batch_Size | Throughput (qps) | device | % of peak |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in qrows:
        for batch in b.batches:
            if batch in r.qps:
                out.append(
                    f"| {r.model} | {r.mode} | {batch} | {r.qps[batch]:,.2f} | {r.device} | "
                    f"{pct(r.peak.get(batch))} |"
                )
    return [*out, ""]


def serving_section(entries: list[dict[str, Any]]) -> list[str]:
    return measured_section(
        "Serving: `quench serve` under load",
        "16 concurrent clients on loopback, one image per request (KServe v2 binary tensor "
        "infer), dynamic batching up to 8 images / 5 ms (`quench serve` defaults); compared "
        "with `quench perf` at batch 8 on the same artifact in this run.",
        [
            "Quant_Mode",
            "images/s served",
            "failed",
            "p50 ms",
            "p99 ms",
            "quench perf b=8",
            "served / perf",
            "server exit",
        ],
        entries,
        "mode",
        lambda e: [
            f"{e['images_per_s']:.1f}",
            str(e.get("failed")),
            fmt(e.get("latency_ms", {}).get("p50")),
            fmt(e.get("latency_ms", {}).get("p99")),
            fmt(e.get("perf_b8")),
            f"{e['images_per_s'] / e['perf_b8']:.2f}x" if e.get("perf_b8") else "-",
            str(e.get("server_exit")),
        ],
    )


def pipeline_section(entries: list[dict[str, Any]], images: Path) -> list[str]:
    return measured_section(
        "End-to-end: JPEG files to top-5",
        f"`quench perf ART --batch 8 --images {rel(images)}`: engine-only qps (random "
        "batch), then every file through the pipeline (decode + resize + normalise on "
        "worker threads, overlapped with inference), then a naive loop (decode a batch, "
        "then infer it), in one command.",
        [
            "Quant_Mode",
            "engine-only qps",
            "pipeline images/s",
            "pipeline / engine",
            "naive loop images/s",
            "images",
        ],
        entries,
        "mode",
        lambda e: [
            f"{e['engine_qps']:.1f}",
            f"{e['pipeline']:.1f}",
            f"{e['pipeline'] / e['engine_qps']:.2f}x",
            f"{e['naive']:.1f}",
            str(e["images"]),
        ],
    )


def memory_section(entries: list[dict[str, Any]]) -> list[str]:
    return measured_section(
        "Peak memory of `quench infer`",
        f"Peak resident set size of the whole `quench infer` process ({MEMORY_MODE} "
        "artifact), on the images above and on them repeated (symlinks).",
        ["images", "peak RSS MiB", "seconds", "images/s", "exit"],
        entries,
        "images",
        lambda e: [
            f"{e['peak_rss_kib'] / 1024:.0f}",
            f"{e['seconds']:.1f}",
            f"{e['images'] / e['seconds']:.1f}",
            str(e["rc"]),
        ],
    )


def builds_section(preps: list[Prep]) -> list[str]:
    if not preps:
        return []
    out = [
        "## Build / quantization times",
        "",
        "Wall time of the whole command (process start, reading calibration images, "
        "calibration, conversion, writing the result).",
        "",
        "| What | Family | Seconds | Notes |",
        "|---|---|---:|---|",
    ]
    for p in preps:
        note = f"**failed**: {p.error}" if p.error else p.detail
        out.append(f"| {p.label} | {p.family} | {fmt(p.seconds)} | {note.replace('|', '/')} |")
    return [*out, ""]


def how_measured(b: Bench, titles: dict[str, str]) -> list[str]:
    """How each figure was measured, then every command, row by row."""
    batches = b.batches
    out = [
        "## How measured",
        "",
        f"- Batch sizes {', '.join(map(str, batches))}; {b.args.duration:g} s per measurement; "
        f"all threads the process may use (no thread flags anywhere).",
        "- qps = images per second (batch x iterations / seconds).",
        "- `quench perf` (ONNX Runtime rows and Quench rows): one random batch, 20 untimed "
        "iterations, then synchronous back-to-back inference for the duration in 5 rounds "
        "that alternate between the batch sizes; p50/p99 over the per-iteration latencies. "
        "On an `.onnx` file it runs a plain "
        "`onnxruntime.InferenceSession(path)` with default session options.",
        "- `benchmark_app`: 3 runs of a third of the duration per batch size (its rounds); "
        "Throughput (FPS), their mean, parsed from its output; it counts images (checked: "
        "batch x count / duration). p50 is the median of its Medians; p99 comes from another "
        "run at "
        f"b={min(batches)} with `-latency_percentile 99`. With the throughput hint several "
        "requests are in flight, so its latency is per request under load.",
        "- % of peak = MACs per image x qps / peak MACs per second for the row's arithmetic "
        "(quench.perf.peak_macs, with the measured clock); Quench rows show `quench perf`'s own "
        "figure, peer rows the same formula applied here.",
        "- INT8 rows calibrate on the same images, read through the resnet50-v1-7 preset's "
        "preprocessing (quench.builder.calibration.load_calibration).",
        *[f"- {n}" for n in b.notes],
        "",
    ]
    for r in b.rows:
        out += [f"**{r.label}** ({titles[r.family]})", "", "```"]
        out += r.commands or ["(not run)"]
        out += ["```", ""]
    if b.preps:
        out += ["Model preparation:", "", "```", *[p.command for p in b.preps], "```", ""]
    return out
