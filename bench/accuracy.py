#!/usr/bin/env python3
"""INT8 accuracy per CPU class: the same artifacts evaluated natively and under ONEDNN_MAX_CPU_ISA.

For each real pretrained classifier (efficientnet-lite0 and -lite1 from ``../shared/models``):
``quench build`` fp32, the default INT8 build (``--target portable``), the same with
``--float-first-layer``, and ``--target native``; all calibrated on ``calib.txt``. Each artifact
is then evaluated (``quench eval`` on ``val.txt``) on this host's own kernels and under each
``ONEDNN_MAX_CPU_ISA`` cap (``AVX2``: AVX2-only CPUs; ``AVX512_CORE``: AVX-512 without VNNI), so
one machine measures every CPU class OpenVINO can emulate. An artifact its self-check refuses on
a class is recorded as refused, with the self-check's figures. OpenVINO engine throughout
(ONNX Runtime has no ISA switch).

    .venv/bin/python bench/accuracy.py [--caps AVX2,AVX512_CORE] [--json out.json] [--md out.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
QUENCH = Path(sys.executable).parent / "quench"
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "imagenet-sample"
MODELS = {
    "efficientnet-lite0": ["--preset", "efficientnet-lite0"],
    "efficientnet-lite1": [
        *("--resize", "274", "--crop", "240"),
        *("--mean", "127.5,127.5,127.5", "--std", "128,128,128"),
    ],
}
BUILDS = {
    "fp32": ["--precision", "force_float32"],
    "int8 portable (default)": ["--precision", "qint8_mixed_float16"],
    "int8 portable --float-first-layer": [
        *("--precision", "qint8_mixed_float16", "--float-first-layer"),
    ],
    "int8 --target native": ["--precision", "qint8_mixed_float16", "--target", "native"],
}
CLASS_OF_CAP = {"": "this CPU", "AVX2": "AVX2 path", "AVX512_CORE": "AVX-512 without VNNI"}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:400] if lines else "no output"


def measure(models: Path, data: Path, work: Path, caps: list[str]) -> list[dict[str, Any]]:
    base = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    results: list[dict[str, Any]] = []
    for model, flags in MODELS.items():
        src = models / f"{model}.onnx"
        for label, bflags in BUILDS.items():
            art = work / f"{model}-{label.split()[0]}-{len(results)}.quench"
            art.unlink(missing_ok=True)
            cmd = [str(QUENCH), "build", str(src), "-o", str(art), "--engine", "openvino"]
            cmd += [*flags, *bflags, "--json"]
            if label != "fp32":
                cmd += ["--calib-images", str(data / "calib.txt")]
            say(f"{model}: build {label}")
            t = time.perf_counter()
            p = run(cmd, base)
            entry: dict[str, Any] = {
                "model": model,
                "build": label,
                "build_command": shlex.join(cmd),
                "build_seconds": round(time.perf_counter() - t, 1),
                "eval": {},
            }
            results.append(entry)
            if p.returncode != 0:
                entry["error"] = last_line(p.stderr or p.stdout)
                continue
            manifest = json.loads(p.stdout)
            entry["fidelity"] = manifest.get("fidelity")
            q = manifest.get("quantization") or {}
            entry["int8_exact_on"] = q.get("int8_exact_on")
            for cap in ["", *caps]:
                env = dict(base, ONEDNN_MAX_CPU_ISA=cap) if cap else base
                ev = [str(QUENCH), "eval", str(art), "--images", str(data / "val.txt")]
                ev += ["--labels", str(data / "ground_truth.tsv"), "--json", "-q"]
                say(f"  eval on {CLASS_OF_CAP.get(cap, cap)}")
                e = run(ev, env)
                key = cap or "native"
                if e.returncode == 0:
                    doc = json.loads(e.stdout)
                    entry["eval"][key] = {"top1": doc["top1"], "top5": doc["top5"]}
                else:
                    entry["eval"][key] = {"error": last_line(e.stderr or e.stdout)}
                entry["eval_command"] = shlex.join(ev)
    return results


def markdown(results: list[dict[str, Any]], caps: list[str]) -> list[str]:
    """A table: one row per (model, build), a top-1 column per CPU class (drop vs fp32)."""
    cols = ["native", *caps]
    head = ["Model", "Build", "INT8 exact on", "held-out agreement / SQNR"]
    head += [f"top-1 {CLASS_OF_CAP.get(c if c != 'native' else '', c)}" for c in cols]
    out = ["| " + " | ".join(head) + " |", "|---|---|---|---|" + "---:|" * len(cols)]
    fp32: dict[tuple[str, str], float] = {}
    for r in results:
        if r["build"] == "fp32":
            for c, v in r["eval"].items():
                if "top1" in v:
                    fp32[(r["model"], c)] = v["top1"]
    refusals: list[str] = []
    for r in results:
        fid = r.get("fidelity") or {}
        if fid.get("top1_agreement") is not None:
            fid_text = f"{fid['top1_agreement']:.1%} / {fid.get('sqnr_db', float('nan')):.1f} dB"
        else:
            fid_text = "—"
        exact = (r.get("int8_exact_on") or "—").split(":")[0].split(" (")[0]
        cells = [r["model"], r["build"], exact, fid_text]
        if "error" in r:
            cells += [f"build failed: {r['error']}"] + [""] * (len(cols) - 1)
        for c in cols if "error" not in r else []:
            v = r["eval"].get(c, {})
            if "top1" in v:
                ref = fp32.get((r["model"], c))
                drop = ""
                if ref and r["build"] != "fp32":
                    drop = f" ({(v['top1'] - ref) * 100:+.2f} pt)"
                cells.append(f"{v['top1']:.4f}{drop}")
            else:
                cells.append("refused" if "self-check" in v.get("error", "") else "failed")
                refusals.append(f"- {r['model']}, {r['build']}, {c}: {v.get('error')}")
        out.append("| " + " | ".join(x.replace("|", "/") for x in cells) + " |")
    return [*out, "", *refusals]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=SHARED / "models")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--caps", default="AVX2,AVX512_CORE", help="ONEDNN_MAX_CPU_ISA values.")
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "accuracy")
    ap.add_argument("--json", type=Path, help="Write the results here.")
    ap.add_argument("--md", type=Path, help="Write the markdown table here.")
    args = ap.parse_args(argv)
    caps = [c.strip().upper() for c in args.caps.split(",") if c.strip()]
    for need in [args.data / "calib.txt", args.data / "val.txt", args.models]:
        if not need.exists():
            ap.error(f"{need}: not found")
    args.work.mkdir(parents=True, exist_ok=True)
    results = measure(args.models.absolute(), args.data.absolute(), args.work.absolute(), caps)
    if args.json:
        args.json.write_text(json.dumps({"caps": caps, "results": results}, indent=2))
    table = "\n".join(markdown(results, caps)) + "\n"
    if args.md:
        args.md.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
