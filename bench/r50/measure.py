"""The two timers bench/run.py reads: ``quench perf`` (its JSON into a row) and OpenVINO's
``benchmark_app`` (its output parsed, in rounds); and ``Bench``, one run's state."""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import Proc, Runner, rel

from r50.config import BENCHMARK_APP, CHW, QUENCH, Built, Prep, Row, say


def quench_perf(
    runner: Runner,
    name: str,
    model: Path,
    out: Path,
    batches: list[int],
    duration: float,
    extra: list[str] | None = None,
) -> tuple[Proc, dict[str, Any] | None]:
    out.unlink(missing_ok=True)
    cmd = [
        rel(QUENCH),
        "perf",
        rel(model),
        "--batch",
        ",".join(map(str, batches)),
        "--duration",
        f"{duration:g}",
        "--json",
        rel(out),
        "-q",
        *(extra or []),
    ]
    timeout = 180 + len(batches) * (2 * duration + 90)
    p = runner.run(name, cmd, timeout)
    doc = None
    if p.ok:
        try:
            doc = json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            p.rc, p.out = 1, p.out + f"\nerror: no JSON results ({exc})"
    return p, doc


def fill_from_perf(row: Row, p: Proc, doc: dict[str, Any] | None, keep_peak: bool) -> None:
    row.commands.append(p.cmd)
    if doc is None:
        row.errors.append(p.error())
        return
    for r in doc["results"]:
        b = int(r["batch"])
        row.qps[b] = float(r["qps"])
        row.rounds[b] = [float(x["qps"]) for x in r.get("rounds", [])]
        row.p50[b] = float(r["latency_ms"]["p50"])
        row.p99[b] = float(r["latency_ms"]["p99"])
        if keep_peak and r.get("peak_share") is not None:
            row.peak[b] = float(r["peak_share"])
        row.device = f"cpu ({r['engine']}, {r['threads']} threads)"
        if row.kind == "quench":
            row.compute = r.get("compute", row.compute)
            row.model = r.get("model", row.model)


BA_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def parse_benchmark_app(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    pats = {
        "fps": rf"Throughput:\s*{BA_NUM}\s*FPS",
        "median": rf"Median:\s*{BA_NUM}\s*ms",
        "pct": rf"(\d+) percentile:\s*{BA_NUM}\s*ms",
        "count": r"Count:\s*(\d+)\s*iterations",
        "duration": rf"Duration:\s*{BA_NUM}\s*ms",
        "precision": r"INFERENCE_PRECISION_HINT:\s*<Type: '(\w+)'>",
        "hint": r"PERFORMANCE_HINT:\s*(\w+)",
        "streams": r"NUM_STREAMS:\s*(\d+)",
        "requests": r"Measuring performance \(.*?(\d+) inference requests?",
        "mode": r"Start inference (\w+)",
    }
    for key, pat in pats.items():
        m = re.search(pat, out)
        if m:
            res[key] = m.groups() if key == "pct" else m[1]
    return res


def ov_precision_name(t: str | None) -> str | None:
    return {"bfloat16": "bf16", "f32": "f32", "float32": "f32", "f16": "f16", "float16": "f16"}.get(
        t or ""
    )


def run_benchmark_app(
    runner: Runner,
    row: Row,
    model: Path,
    extra: list[str],
    batches: list[int],
    duration: float,
    rounds: int = 3,
) -> dict[str, Any]:
    """benchmark_app at each batch size, ``rounds`` runs of ``duration / rounds`` seconds each
    (their spread is the noise a comparison must beat), + one -latency_percentile 99 run at the
    smallest."""
    seen: dict[str, Any] = {}
    for b in batches:
        cmd = [
            rel(BENCHMARK_APP),
            "-m",
            rel(model),
            "-d",
            "CPU",
            *extra,
            "-shape",
            f"[{b},{','.join(map(str, CHW))}]",
            "-t",
            f"{duration / rounds:g}",
        ]
        fps, medians = [], []
        for k in range(rounds):
            say(f"  {row.label}: batch {b}, round {k + 1}/{rounds}")
            p = runner.run(f"ba-{row.label}-b{b}-r{k + 1}", cmd, 240 + 3 * duration)
            row.commands.append(p.cmd)
            r = parse_benchmark_app(p.out)
            if not p.ok or "fps" not in r:
                row.errors.append(f"batch {b}: {p.error() if not p.ok else 'no Throughput line'}")
                break
            fps.append(float(r["fps"]))
            if "median" in r:
                medians.append(float(r["median"]))
            if "count" in r and "duration" in r:
                own = b * int(r["count"]) / (float(r["duration"]) / 1e3)
                if abs(own - fps[-1]) > 0.05 * fps[-1]:
                    row.notes.append(
                        f"batch {b}: Throughput {fps[-1]:.1f} FPS but batch x count / duration "
                        f"= {own:.1f}"
                    )
            if not seen:
                seen = r
        if len(fps) < rounds:
            continue
        row.rounds[b] = fps
        row.qps[b] = statistics.fmean(fps)
        if medians:
            row.p50[b] = statistics.median(medians)
        if b == min(batches):
            p99 = [*cmd, "-latency_percentile", "99"]
            say(f"  {row.label}: batch {b}, p99 run")
            q = runner.run(f"ba-{row.label}-b{b}-p99", p99, 240 + 3 * duration)
            row.commands.append(q.cmd)
            rq = parse_benchmark_app(q.out)
            if q.ok and rq.get("pct"):
                row.p99[b] = float(rq["pct"][1])
            else:
                row.errors.append(f"batch {b} p99 run: {q.error() if not q.ok else 'no line'}")
    if seen:
        prec = ov_precision_name(seen.get("precision"))
        reqs = f"{seen['requests']} requests, " if seen.get("requests") else ""
        row.settings += (
            f"; ran as: {seen.get('hint', '?').lower()} hint, inference precision "
            f"{prec or '?'}, {seen.get('streams', '?')} stream(s), {reqs}"
            f"{seen.get('mode', '?')}"
        )
        row.device = "cpu (OpenVINO benchmark_app)"
    return seen


@dataclass
class Bench:
    """One run: its arguments, the command runner and everything measured so far."""

    args: argparse.Namespace
    runner: Runner
    src: Path  # the ResNet-50 replica
    rows: list[Row] = field(default_factory=list)
    preps: list[Prep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the report's "How measured" extras
    built: list[Built] = field(default_factory=list)
    capped_titles: dict[str, str] = field(default_factory=dict)  # int8@CAP -> section title
    serving: list[dict[str, Any]] = field(default_factory=list)
    pipeline: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    accuracy: list[str] = field(default_factory=list)  # bench/accuracy.py's lines

    @property
    def work(self) -> Path:
        return self.args.work

    @property
    def batches(self) -> list[int]:
        return self.args.batch_list

    @property
    def families(self) -> list[str]:
        return self.args.families

    def perf(
        self,
        name: str,
        model: Path,
        out: Path,
        extra: list[str] | None = None,
        runner: Runner | None = None,
    ) -> tuple[Proc, dict[str, Any] | None]:
        """``quench perf`` at this run's batch sizes and duration."""
        runner = runner or self.runner
        return quench_perf(runner, name, model, out, self.batches, self.args.duration, extra)

    def benchmark_app(
        self, row: Row, model: Path, extra: list[str], runner: Runner | None = None
    ) -> dict[str, Any]:
        runner = runner or self.runner
        return run_benchmark_app(runner, row, model, extra, self.batches, self.args.duration)
