#!/usr/bin/env python3
"""Reduced precision, measured: fp32, bf16 and fp16 builds of each real model, their top-1 on
``val.txt`` and their speed at batch 1 and 8, with the measured clock, in one run.

For each model (efficientnet-lite0 and -lite1 from ``../shared/models``), with OpenVINO:

1. ``quench build`` fp32; bf16 as a user builds it (``--calib-images calib.txt``: the fidelity
   gate, and the repair that keeps layers in fp32 when it misses); bf16 with every layer in bf16
   (``--no-repair --min-top1-agreement 0``: the speed the repair is measured against); fp16
   (``force_float16``: fp16 compute only where measured faster than fp32);
2. ``quench eval`` each on ``val.txt`` (800 images);
3. ``quench perf --batch 1,8`` on every build in ``--rounds`` alternating rounds (the order
   rotates each round); ratios with their noise (``quench.stats.compare``, paired by round).

Then writes a "Reduced precision" section of BENCHMARKS.md between ``<!-- precision -->``.

    .venv/bin/python bench/precision.py [--rounds 5] [--duration 4] [--models lite0,lite1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import cpu_line, rotating_rounds, timed_quench, write_section

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"
MODELS = SHARED / "models"
MARK = "<!-- precision -->"
LITE1 = ["--resize", "274", "--crop", "240", "--mean", "127.5,127.5,127.5", "--std", "128,128,128"]
MODEL_FLAGS = {
    "lite0": ("efficientnet-lite0.onnx", ["--preset", "efficientnet-lite0"]),
    "lite1": ("efficientnet-lite1.onnx", LITE1),
}
CALIB = ["--calib-images", str(SAMPLE / "calib.txt")]
BUILDS = {
    "fp32": ["--precision", "force_float32"],
    "bf16 (default)": ["--precision", "force_bfloat16", *CALIB],
    "bf16, every layer": [
        *("--precision", "force_bfloat16", "--no-repair", "--min-top1-agreement", "0", *CALIB),
    ],
    "fp16 (default)": ["--precision", "force_float16", *CALIB],
}
BATCHES = (1, 8)


def say(msg: str) -> None:
    print(f"[precision] {msg}", file=sys.stderr, flush=True)


def build(model: str, name: str, work: Path) -> dict[str, Any]:
    file, prep = MODEL_FLAGS[model]
    out = work / f"{model}-{name.split()[0]}{'-all' if 'every' in name else ''}.quench"
    args = ["build", str(MODELS / file), "-o", str(out), *prep, "--engine", "openvino"]
    args += [*BUILDS[name], "-q"]
    seconds, done = timed_quench(args, dict(os.environ))
    if done.returncode != 0:
        return {"ok": False, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    from quench.model import Model

    with Model.load(out, check="off") as m:
        man = m.manifest
    precision = man["precision"]
    red = man.get("reduced_precision") or {}
    return {
        "ok": True,
        "artifact": str(out),
        "seconds": round(seconds, 1),
        "computes": precision.get("computes"),
        "fp32_layers": len(red.get("float32_layers", [])),
        "fidelity": man.get("fidelity"),
        "fp16_compute": precision.get("fp16_compute"),
    }


def top1(art: str) -> float | None:
    args = ["eval", art, "--images", str(SAMPLE / "val.txt")]
    args += ["--labels", str(SAMPLE / "ground_truth.tsv"), "--json"]
    _, done = timed_quench(args, dict(os.environ))
    if done.returncode != 0:
        return None
    return float(json.loads(done.stdout)["top1"])


def perf(art: str, duration: float, work: Path) -> dict[int, float]:
    out = work / "perf.json"
    args = ["perf", art, "--batch", ",".join(map(str, BATCHES)), "--duration", str(duration)]
    _, done = timed_quench([*args, "--rounds", "1", "--json", str(out), "-q"], dict(os.environ))
    if done.returncode not in (0, 1):
        raise SystemExit(f"quench perf {art} failed:\n{done.stderr[-2000:]}")
    return {int(r["batch"]): float(r["qps"]) for r in json.loads(out.read_text())["results"]}


def speeds(arts: dict[str, str], rounds: int, duration: float, work: Path) -> dict[str, Any]:
    """Per build and batch, each round's qps; the order rotates every round."""
    per = rotating_rounds(list(arts), rounds, lambda n: perf(arts[n], duration, work))
    return {n: {b: [q[b] for q in qs if b in q] for b in BATCHES} for n, qs in per.items()}


def ratio(got: dict[str, Any], a: str, b: str, batch: int) -> str:
    from quench.stats import compare

    if a not in got or b not in got:
        return "-"
    c = compare(got[a][batch], got[b][batch], paired=True)
    verdict = "tie" if c.winner == "tie" else "faster" if c.winner == "a" else "slower"
    return f"{c.ratio:.2f}x ({verdict})"


def run_model(model: str, a: argparse.Namespace) -> dict[str, Any]:
    builds = {}
    for name in BUILDS:
        say(f"{model}: build {name}")
        builds[name] = b = build(model, name, a.work)
        if b["ok"]:
            say(f"{model}: eval {name}")
            b["top1"] = top1(b["artifact"])
    arts = {n: b["artifact"] for n, b in builds.items() if b["ok"]}
    say(f"{model}: speed, {a.rounds} rotating rounds of {len(arts)} builds")
    got = speeds(arts, a.rounds, a.duration, a.work)
    return {"model": model, "builds": builds, "qps": got}


def machine() -> str:
    from quench.clock import core_clock
    from quench.hw import reported_clock_hz

    hz, where = reported_clock_hz()
    reported = f"{hz / 1e9:.2f} GHz ({where})" if hz else "unknown"
    return f"{cpu_line()}; core clock {core_clock().describe()}; the system reports {reported}"


def _cell(b: dict[str, Any], fp32: float | None) -> str:
    t = b.get("top1")
    if t is None:
        return "-"
    return f"{t:.4f}" + (f" ({(t - fp32) * 100:+.2f})" if fp32 is not None else "")


def report(rows: list[dict[str, Any]], a: argparse.Namespace) -> str:
    from statistics import median

    lines = [
        MARK,
        "## Reduced precision: bf16 and fp16 against fp32",
        "",
        f"Produced {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
        f"`.venv/bin/python bench/precision.py --rounds {a.rounds} --duration {a.duration}` on "
        f"{machine()}. OpenVINO; top-1 on `val.txt` (800 images, change against fp32 in "
        "points); qps is the median of the rounds of `quench perf` (every build in each round, "
        "the order rotating); ratios are paired by round (a tie when inside the noise). "
        "`bf16 (default)` is built with `--calib-images calib.txt`: its fidelity gate "
        "(top-1 agreement >= 0.98 with fp32) and, when it misses, the repair that keeps layers "
        "in fp32.",
        "",
        "| model | build | computes | fp32 layers | gate: top-1 agreement | top-1 | b1 qps | "
        "b8 qps | "
        "b8 vs bf16 every layer | b8 vs fp32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        fp32 = r["builds"]["fp32"].get("top1")
        for name, b in r["builds"].items():
            if not b["ok"]:
                lines.append(f"| {r['model']} | {name} | failed: {b['error']} | | | | | | | |")
                continue
            q = r["qps"].get(name, {})
            f = b.get("fidelity") or {}
            fid = f.get("top1_agreement")
            gate = "-" if fid is None else f"{fid:.3f} ({f.get('images')} {f.get('source')})"
            lines.append(
                f"| {r['model']} | {name} | {b['computes']} | {b['fp32_layers']} | {gate}"
                + f" | {_cell(b, fp32)} | "
                + " | ".join(f"{median(q[bt]):.1f}" if q.get(bt) else "-" for bt in BATCHES)
                + f" | {ratio(r['qps'], name, 'bf16, every layer', 8)} | "
                f"{ratio(r['qps'], name, 'fp32', 8)} |"
            )
    lines += ["", MARK]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODEL_FLAGS), help="lite0,lite1")
    ap.add_argument("--rounds", type=int, default=5, help="rotating perf rounds")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per perf run")
    ap.add_argument("--md", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--work", type=Path, help="default: a temporary folder")
    a = ap.parse_args()
    a.work = a.work or Path(tempfile.mkdtemp(prefix="quench-precision-bench-"))
    a.work.mkdir(parents=True, exist_ok=True)
    rows = [run_model(m, a) for m in a.models.split(",")]
    (a.work / "precision.json").write_text(json.dumps(rows, indent=2, default=str))
    section = report(rows, a)
    write_section(a.md, MARK, section)
    print(section)
    say(f"wrote the section to {a.md}; figures in {a.work / 'precision.json'}")


if __name__ == "__main__":
    main()
