#!/usr/bin/env python3
"""Accuracy repair, measured: build time (with the search's parts), accuracy, and the speed of
the repaired build against the all-INT8 build of the same model, in one run.

For each case (a model, its preprocessing flags, an accuracy bound, and optionally an ISA cap
``ONEDNN_MAX_CPU_ISA`` for OpenVINO's older kernels):

1. ``quench build ... --no-repair`` with no bound: the all-INT8 build (its speed is the baseline);
2. ``quench build ... BOUND`` (the repair runs if the all-INT8 build misses), timed as a user
   times it (the whole command);
3. ``quench perf A --batch 8 --json`` on both artifacts in alternating rounds; the speed ratio
   with its noise (``quench.stats.compare``: a tie inside the noise).

Then writes a section of BENCHMARKS.md between ``<!-- repair -->`` markers.

    .venv/bin/python bench/repair.py [--rounds 3] [--duration 5] [--cases lite0,lite0-avx2,...]
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

from common import cpu_line, timed_quench, write_section

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"
MODELS = SHARED / "models"
MARK = "<!-- repair -->"

LITE0 = ["--preset", "efficientnet-lite0"]
LITE1 = ["--resize", "274", "--crop", "240", "--mean", "127.5,127.5,127.5", "--std", "128,128,128"]
# name: (model file, preprocessing flags, bound flags, extra flags, environment)
CASES: dict[str, tuple[str, list[str], list[str], list[str], dict[str, str]]] = {
    "lite0": ("efficientnet-lite0.onnx", LITE0, ["--max-top1-drop", "0.3"], [], {}),
    "lite0-avx2": (
        "efficientnet-lite0.onnx",
        LITE0,
        ["--max-top1-drop", "0.3"],
        ["--engine", "openvino"],
        {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    ),
    "lite0-tight": ("efficientnet-lite0.onnx", LITE0, ["--max-top1-drop", "0.1"], [], {}),
    "lite1": ("efficientnet-lite1.onnx", LITE1, ["--max-top1-drop", "0.3"], [], {}),
    "lite1-agreement": ("efficientnet-lite1.onnx", LITE1, ["--min-top1-agreement", "1.0"], [], {}),
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def manifest(art: Path) -> dict[str, Any]:
    from quench.model import Model

    with Model.load(art, check="off") as m:
        return m.manifest


def build(case: str, work: Path, repair: bool) -> dict[str, Any]:
    model, prep, bound, extra, env_extra = CASES[case]
    env = {**os.environ, **env_extra}
    out = work / f"{case}-{'repaired' if repair else 'int8'}.quench"
    args = [
        "build",
        str(MODELS / model),
        "-o",
        str(out),
        *prep,
        "--precision",
        "qint8_mixed_float32",
        "--calib-images",
        str(SAMPLE / "calib.txt"),
        "--check-images",
        str(SAMPLE / "val.txt"),
        "--check-labels",
        str(SAMPLE / "ground_truth.tsv"),
        *extra,
        *(bound if repair else ["--no-repair"]),
        "-q",
    ]
    seconds, done = timed_quench(args, env)
    if done.returncode != 0:
        return {"ok": False, "seconds": seconds, "error": done.stderr.strip().splitlines()[-1]}
    m = manifest(out)
    q = m.get("quantization", {})
    rep = q.get("repair")
    return {
        "ok": True,
        "artifact": str(out),
        "seconds": round(seconds, 1),
        "command": "quench " + " ".join([*args[:1], Path(args[1]).name, *args[2:]]),
        "engine": m["engine"]["name"],
        "accuracy": m.get("accuracy"),
        "float_layers": q.get("float_layers", []),
        "repair": None
        if not rep
        else {
            "ranked": len(rep["ranking"]),
            "steps": [(s["float_layers"], s["passed"], s["seconds"]) for s in rep["steps"]],
            "seconds": rep["seconds"],
        },
        "timings": m.get("timings", {}),
        "env": env_extra,
    }


def same_bytes(a: str, b: str) -> bool:
    return Path(a).read_bytes() == Path(b).read_bytes()


def speed_text(s: dict[str, Any] | None) -> str:
    """The bounded build's speed as a fraction of the all-INT8 build's, with its noise."""
    if not s:
        return "same artifact"
    low, high = s["ci"]
    verdict = "tie" if s["winner"] == "tie" else "faster" if s["winner"] == "a" else "slower"
    return f"{s['ratio']:.3f}x ({verdict}; 95% CI {low:.3f}-{high:.3f}, {s['rounds']} rounds)"


def perf(art: str, env: dict[str, str], duration: float, work: Path) -> float:
    out = work / "perf.json"
    args = ["perf", art, "--batch", "8", "--duration", str(duration), "--json", str(out), "-q"]
    _, done = timed_quench(args, env)
    if done.returncode not in (0, 1):
        raise SystemExit(f"quench perf {art} failed:\n{done.stderr[-2000:]}")
    results = json.loads(out.read_text())
    rows = results["results"] if isinstance(results, dict) else results
    return float(rows[0]["qps"])


def speed(a: str, b: str, env: dict[str, str], rounds: int, duration: float, work: Path):
    """Alternating rounds of ``a`` and ``b`` (who goes first alternates too)."""
    from quench.stats import compare

    qa: list[float] = []
    qb: list[float] = []
    for r in range(rounds):
        pair = [(a, qa), (b, qb)] if r % 2 == 0 else [(b, qb), (a, qa)]
        for art, into in pair:
            into.append(perf(art, env, duration, work))
    return qa, qb, compare(qa, qb, paired=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    ap.add_argument("--rounds", type=int, default=3, help="alternating perf rounds")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per perf run")
    ap.add_argument("--md", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--work", type=Path, help="default: a temporary folder")
    ap.add_argument("--report-only", action="store_true", help="rewrite the section from WORK")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="quench-repair-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if a.report_only:
        rows = json.loads((work / "repair.json").read_text())
    for case in [] if a.report_only else a.cases.split(","):
        say(f"{case}: all-INT8 build")
        base = build(case, work, repair=False)
        say(f"{case}: build with the bound")
        fixed = build(case, work, repair=True)
        row: dict[str, Any] = {"case": case, "int8": base, "bounded": fixed}
        if base["ok"] and fixed["ok"] and not same_bytes(base["artifact"], fixed["artifact"]):
            say(f"{case}: speed, {a.rounds} alternating rounds")
            qa, qb, c = speed(fixed["artifact"], base["artifact"], {**os.environ, **fixed["env"]},
                              a.rounds, a.duration, work)  # fmt: skip
            row["speed"] = {"bounded_qps": qa, "int8_qps": qb, **c.to_dict()}
        rows.append(row)
        say(json.dumps(row, default=str)[:600])
    (work / "repair.json").write_text(json.dumps(rows, indent=2, default=str))
    section = report(rows, a)
    write_section(a.md, MARK, section)
    print(section)
    say(f"wrote the section to {a.md}; figures in {work / 'repair.json'}")


def _acc(b: dict[str, Any]) -> str:
    acc = b.get("accuracy") or {}
    if not acc:
        return "-"
    return (
        f"{acc['built']['top1']:.4f} (fp32 {acc['fp32']['top1']:.4f}, "
        f"drop {acc['top1_drop_points']:.2f} pt)"
    )


def report(rows: list[dict[str, Any]], a: argparse.Namespace) -> str:
    lines = [
        MARK,
        "## Accuracy repair: `quench build` with an accuracy bound",
        "",
        f"Produced {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by "
        f"`.venv/bin/python bench/repair.py --rounds {a.rounds} --duration {a.duration}` on "
        f"{cpu_line()}. INT8 (`qint8_mixed_float32`), calibrated on `calib.txt`, checked on "
        "`val.txt` (800 images). Build time is the whole command; the speed is "
        f"`quench perf --batch 8` on the bounded build and the all-INT8 build in {a.rounds} "
        "alternating rounds (a tie when inside the noise).",
        "",
        "| case | bound | all INT8 (no repair) | bounded build | float layers | search | "
        "build s | speed vs all INT8, b8 |",
        "|---|---|---|---|---|---|---:|---|",
    ]
    for r in rows:
        model, _, bound, extra, env = CASES[r["case"]]
        base, fixed = r["int8"], r["bounded"]
        where = " ".join([*extra, *(f"{k}={v}" for k, v in env.items())])
        if not fixed["ok"]:
            lines.append(
                f"| {model} {where} | `{' '.join(bound)}` | {_acc(base)} | failed: "
                f"{fixed['error']} | | | {fixed['seconds']:.0f} | |"
            )
            continue
        rep = fixed["repair"]
        search = "not needed"
        if rep:
            steps = ", ".join(
                f"k={k} {'pass' if p else 'miss'} {s:.1f}s" for k, p, s in rep["steps"]
            )
            search = (
                f"{rep['ranked']} layers ranked in {rep['seconds']['rank']:.0f} s; {steps} "
                f"(search {rep['seconds']['search']:.0f} s)"
            )
        spd = r.get("speed")
        lines.append(
            f"| {model} {where} | `{' '.join(bound)}` | {_acc(base)} | {_acc(fixed)} on "
            f"{fixed['engine']} | {len(fixed['float_layers'])} | {search} | "
            f"{fixed['seconds']:.0f} | {speed_text(spd)} |"
        )
    lines += [
        "",
        "Where each bounded build's time went (manifest `timings`, seconds): "
        + "; ".join(
            f"{r['case']}: "
            + ", ".join(f"{k} {v:.0f}" for k, v in r["bounded"].get("timings", {}).items())
            for r in rows
            if r["bounded"]["ok"]
        )
        + ".",
        MARK,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
