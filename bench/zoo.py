#!/usr/bin/env python3
"""Model breadth: every ONNX classifier in some folders, built in every precision, checked
against ONNX Runtime on the source model and timed against plain ONNX Runtime and OpenVINO's
``benchmark_app``, in one run -> BENCHMARKS.md "Model breadth" (between ``<!-- zoo -->``).

For each ``NAME.onnx`` (its build flags from ``NAME.json`` beside it when there is one, as
``bench/export_models.py`` writes them; otherwise the generic ImageNet preset):

1. per precision: ``quench build`` timed as a whole command (built, or refused with the one
   line it printed; a traceback is reported as such), then agreement with ONNX Runtime on the
   source model on the same photos (max |diff| for fp32, output SQNR in dB for the reduced
   precisions);
2. the timings, in ``--rounds`` interleaved rounds (each round times every peer and every
   build once at each batch size, the order rotating): plain ONNX Runtime (``quench perf
   model.onnx``: a default ``InferenceSession``), ``benchmark_app -hint latency
   -infer_precision f32`` (OpenVINO's own tool) and ``quench perf`` on each artifact. qps is
   the median over the rounds (with their spread); Quench / best peer is computed per round
   (against the faster peer of that round), then medianed, and paired by round for the noise.

Runs with Quench's venv, no torch::

    .venv/bin/python bench/zoo.py DIR [DIR...] [--precisions force_float32,...]
        [--batches 1,8] [--duration 10] [--rounds 3] [--calib-count 200] [--select-budget 30]
        [--models deit_small,...] [--work DIR] [--md BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import loadavg, md_row, rotating_rounds, timed_quench, write_section

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
BENCHMARK_APP = Path(sys.executable).parent / "benchmark_app"
MARK = "<!-- zoo -->"
PRECISIONS = ("force_float32", "force_bfloat16", "force_float16", "qint8_mixed_float16")
SHORT = {
    "force_float32": "fp32",
    "force_bfloat16": "bf16",
    "force_float16": "fp16",
    "qint8_mixed_float16": "int8+fp16",
    "qint8_mixed_float32": "int8",
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    """The line a failed command ended on; a traceback is named as one."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "no output"
    last = lines[-1][:300].removeprefix("error: ")
    return f"traceback: {last}" if any(ln.startswith("Traceback") for ln in lines) else last


def build_flags(model: Path) -> list[str]:
    side = model.with_suffix(".json")
    return list(json.loads(side.read_text())["build_flags"]) if side.exists() else []


def crop_of(flags: list[str]) -> int:
    return int(flags[flags.index("--crop") + 1]) if "--crop" in flags else 224


def fixed_batch(model: Path) -> int | None:
    """The source model's batch size when its input declares one."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    dim = inp.type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def quench_perf(target: Path, batches: list[int], a: argparse.Namespace) -> dict[int, Any]:
    """qps per batch size (a failed batch size: its error line)."""
    out: dict[int, Any] = {}
    for b in batches:
        js = a.work / "perf.json"
        js.unlink(missing_ok=True)
        args = ["perf", str(target), "--batch", str(b), "--duration", f"{a.duration:g}"]
        _, done = timed_quench([*args, "--json", str(js), "-q"], dict(os.environ))
        if done.returncode not in (0, 1) or not js.exists():
            out[b] = one_line(done.stderr or done.stdout)
            continue
        doc = json.loads(js.read_text())
        rows = doc["results"] if isinstance(doc, dict) else doc
        out[b] = float(rows[0]["qps"])
    return out


def benchmark_app(model: Path, crop: int, batches: list[int], a: argparse.Namespace):
    """OpenVINO's benchmark_app, f32 with the latency hint: FPS per batch size."""
    out: dict[int, Any] = {}
    for b in batches:
        cmd = [str(BENCHMARK_APP), "-m", str(model), "-d", "CPU", "-hint", "latency"]
        cmd += ["-infer_precision", "f32", "-shape", f"[{b},3,{crop},{crop}]"]
        cmd += ["-t", str(max(1, math.ceil(a.duration)))]  # it takes whole seconds only
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300 + 3 * a.duration)
        m = re.search(r"Throughput:\s*([0-9.]+)\s*FPS", done.stdout)
        out[b] = float(m[1]) if done.returncode == 0 and m else one_line(done.stdout + done.stderr)
    return out


def agreement(src: Path, art: Path, images: list[Path]) -> dict[str, float]:
    """The artifact against ONNX Runtime on the source model, on the same preprocessed photos."""
    import onnxruntime as ort

    from quench.model import Model
    from quench.perf import load_inputs

    with Model.load(art, check="off") as m:
        x = load_inputs(m, images)
        got = m.predict(x).astype(np.float64)
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    parts = [x[i : i + fixed] for i in range(0, len(x), fixed)] if fixed else [x]
    ref = np.concatenate([sess.run(None, {inp.name: p})[0] for p in parts]).astype(np.float64)
    ref, got = ref.reshape(len(x), -1), got.reshape(len(x), -1)
    noise = float(np.sum((ref - got) ** 2))
    sqnr = 10 * np.log10(float(np.sum(ref**2)) / noise) if noise > 0 else float("inf")
    return {
        "max_abs_diff": float(np.max(np.abs(ref - got))),
        "max_abs_ref": float(np.max(np.abs(ref))),
        "sqnr_db": float(sqnr),
        "top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1))),
    }


def build(src: Path, mode: str, a: argparse.Namespace, dynamic: bool) -> dict[str, Any]:
    """``dynamic``: the source declares a fixed batch and other batch sizes are timed, so the
    build asks for a mutable batch (Quench's checked Reshape rewrite, or its one-line refusal)."""
    art = a.work / f"{src.stem}-{mode}.quench"
    args = ["build", str(src), "-o", str(art), *build_flags(src), "--precision", mode]
    args += ["--dynamic-batch"] if dynamic else []
    args += ["--select-budget", f"{a.select_budget:g}", "-q"]
    if "qint8" in mode:
        args += ["--calib-images", str(a.calib_images), "--calib-count", str(a.calib_count)]
    seconds, done = timed_quench(args, dict(os.environ))
    row: dict[str, Any] = {"mode": mode, "seconds": round(seconds, 1)}
    row["command"] = "quench " + " ".join(args)
    if done.returncode != 0 or not art.exists():
        return {**row, "ok": False, "error": one_line(done.stderr or done.stdout)}
    from quench.model import Model

    with Model.load(art, check="off") as m:
        man = m.manifest
    row.update(ok=True, artifact=str(art), engine=man["engine"]["name"], dynamic_batch=dynamic)
    rep = man.get("quantization", {}).get("float_layers") or []
    if rep:
        row["float_layers"] = len(rep)
    return row


def run_model(src: Path, a: argparse.Namespace, images: list[Path]) -> dict[str, Any]:
    flags = build_flags(src)
    entry: dict[str, Any] = {"model": src.stem, "flags": flags, "rows": []}
    fixed = fixed_batch(src)
    # a source model of fixed batch runs at that batch only in ONNX Runtime
    runs = [b for b in a.batches if fixed is None or b == fixed]
    for mode in a.precisions:
        say(f"{src.stem}: {mode}")
        row = build(src, mode, a, dynamic=fixed is not None and runs != a.batches)
        if row["ok"]:
            try:
                row["agreement"] = agreement(src, Path(row["artifact"]), images)
            except Exception as exc:  # a figure we could not take; the row stays
                row["agreement_error"] = f"{type(exc).__name__}: {exc}"[:200]
        entry["rows"].append(row)
    built = {r["mode"]: Path(r["artifact"]) for r in entry["rows"] if r["ok"]}
    timers = {
        "ort": lambda: quench_perf(src, runs, a),
        "openvino": lambda: benchmark_app(src, crop_of(flags), a.batches, a),
        **{mode: (lambda art=art: quench_perf(art, a.batches, a)) for mode, art in built.items()},
    }
    say(f"{src.stem}: {a.rounds} rotating rounds of {len(timers)} timings")
    got = rotating_rounds(list(timers), a.rounds, lambda name: timers[name]())
    entry["rounds"] = {n: by_batch(per_round, a.batches) for n, per_round in got.items()}
    entry["ort"] = median_or_error(got["ort"], a.batches)
    entry["ort"].update({b: f"source has fixed batch {fixed}" for b in a.batches if b not in runs})
    entry["openvino"] = median_or_error(got["openvino"], a.batches)
    for row in entry["rows"]:
        if row["ok"]:
            row["qps"] = median_or_error(got[row["mode"]], a.batches)
            Path(row["artifact"]).unlink(missing_ok=True)  # they are large; the JSON keeps all
    return entry


def by_batch(per_round: list[dict[int, Any]], batches: list[int]) -> dict[int, list[Any]]:
    """One timer's rounds by batch size: each round's qps (or its error line)."""
    return {b: [r.get(b) for r in per_round] for b in batches}


def median_or_error(per_round: list[dict[int, Any]], batches: list[int]) -> dict[int, Any]:
    """Per batch size the median qps over the rounds, or the first error line of a round."""
    out: dict[int, Any] = {}
    for b, values in by_batch(per_round, batches).items():
        bad = [v for v in values if not isinstance(v, float)]
        if bad or not values:
            out[b] = bad[0] if bad else "not timed"
        else:
            out[b] = statistics.median(values)
    return out


def spread_text(values: list[Any]) -> str:
    """`` ±x%``: half the range of the rounds against their median (nothing for one round)."""
    qs = [v for v in values if isinstance(v, float)]
    if len(qs) < 2:
        return ""
    return f" ±{(max(qs) - min(qs)) / 2 / statistics.median(qs):.0%}"


def vs_best(quench: list[Any], peers: list[list[Any]]) -> str:
    """Quench / the faster peer, per round, medianed; (tie), faster or slower by the paired
    rounds (``quench.stats.compare``)."""
    from quench.stats import compare

    pairs = []
    for r, q in enumerate(quench):
        best = max((p[r] for p in peers if r < len(p) and isinstance(p[r], float)), default=None)
        if isinstance(q, float) and best:
            pairs.append((q, best))
    if not pairs:
        return "-"
    ratio = statistics.median(q / best for q, best in pairs)
    c = compare([q for q, _ in pairs], [best for _, best in pairs], paired=True)
    verdict = "tie" if c.winner == "tie" else "faster" if c.winner == "a" else "slower"
    return f"{ratio:.2f}x ({verdict})"


def fmt_qps(v: Any, rounds: list[Any] | None = None) -> str:
    """The median qps with the rounds' spread; n/a (fixed batch) or failed."""
    if isinstance(v, float):
        return f"{v:,.1f}{spread_text(rounds or [])}"
    return "n/a" if str(v).startswith("source has fixed batch") else "failed"


def table(entries: list[dict[str, Any]], batches: list[int]) -> list[str]:
    head = "| model | precision | built | build s | agreement with ORT | engine |"
    head += "".join(f" Quench b{b} | ORT b{b} | OpenVINO b{b} | vs best b{b} |" for b in batches)
    lines = [head, "|" + "---|" * (6 + 4 * len(batches))]
    for e in entries:
        for r in e["rows"]:
            if not r["ok"]:
                built, agree = f"refused: {r['error'].replace('|', '/')}", "-"
            else:
                g = r.get("agreement")
                extra = f", {r['float_layers']} layers float" if r.get("float_layers") else ""
                extra += " (--dynamic-batch)" if r.get("dynamic_batch") else ""
                built = "built" + extra
                if g is None:
                    agree = r.get("agreement_error", "-")
                elif r["mode"] == "force_float32":
                    agree = f"max abs diff {g['max_abs_diff']:.2e} (of {g['max_abs_ref']:.2g})"
                else:
                    agree = f"SQNR {g['sqnr_db']:.1f} dB, top-1 {g['top1_agreement']:.0%}"
            cells = [e["model"], SHORT.get(r["mode"], r["mode"]), built, f"{r['seconds']:.0f}"]
            cells += [agree, r.get("engine", "-")]
            rounds = e.get("rounds", {})
            for b in batches:
                q = r.get("qps", {}).get(b)
                mine = rounds.get(r["mode"], {}).get(b, [])
                ort_r = rounds.get("ort", {}).get(b, [])
                ov_r = rounds.get("openvino", {}).get(b, [])
                cells.append(fmt_qps(q, mine) if r["ok"] else "-")
                cells += [fmt_qps(e["ort"].get(b), ort_r), fmt_qps(e["openvino"].get(b), ov_r)]
                cells.append(vs_best(mine, [ort_r, ov_r]) if r["ok"] else "-")
            lines.append(md_row(cells))
    return lines


def errors(entries: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in entries:
        for peer in ("ort", "openvino"):
            for b, v in e[peer].items():
                if not isinstance(v, float):
                    out.append(f"- {e['model']}, {peer} batch {b}: {v}")
        for r in e["rows"]:
            for b, v in r.get("qps", {}).items():
                if not isinstance(v, float):
                    out.append(f"- {e['model']} {r['mode']}, quench perf batch {b}: {v}")
    return out


def report(entries: list[dict[str, Any]], a: argparse.Namespace, started: str) -> str:
    from quench.hw import cpu_info
    from quench.stats import RULE

    cpu = cpu_info()
    flags = ", ".join(str(f) for f in cpu.get("flags", [])) or "no AVX2"  # type: ignore[attr-defined]
    import onnxruntime
    import openvino

    load = loadavg()
    mark = MARK if a.title == "Model breadth" else f"<!-- zoo: {a.title} -->"
    lines = [
        mark,
        f"## {a.title}",
        "",
        f"Produced {started} by `.venv/bin/python bench/zoo.py {' '.join(map(str, a.dirs))} "
        f"--precisions {','.join(a.precisions)} --batches {','.join(map(str, a.batches))} "
        f"--duration {a.duration:g} --rounds {a.rounds} --calib-count {a.calib_count} "
        f"--select-budget {a.select_budget:g}"
        + (f" --title '{a.title}'" if a.title != "Model breadth" else "")
        + f"` on {cpu['model']} ({cpu['cores']} cores; {flags}); "
        f"onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__.split('-')[0]}; "
        f"load average at the end {load}.",
        "",
        "Models with random weights (`bench/export_models.py`, zoo-light graphs inflated by "
        "`inflate_light_models.py`): speed and agreement mean something, top-1 on photos does "
        f"not. Agreement: the artifact against ONNX Runtime on the source model, on the same "
        f"{a.agree_count} photos of `{a.images.name}` (max |diff| for fp32, with the largest "
        "|output|; output SQNR and top-1 agreement for the reduced precisions). qps: `quench "
        "perf` (random input, engine only), plain ONNX Runtime (`quench perf model.onnx`, a "
        "default session) and `benchmark_app -hint latency -infer_precision f32`, "
        f"{a.duration:g} s per batch size, in {a.rounds} interleaved rounds (each round times "
        "every peer and build once, the order rotating); the median over the rounds, ±half "
        "their range against it. `vs best`: Quench against the faster fp32 peer of each round, "
        f"medianed over the rounds; faster, slower or tie by the rounds paired ({RULE}). "
        "INT8 calibrated on "
        f"{a.calib_count} images of `{a.calib_images.name}`.",
        "",
        *table(entries, a.batches),
    ]
    errs = errors(entries)
    if errs:
        lines += ["", "Measurements that failed:", "", *errs]
    return "\n".join([*lines, "", mark, ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="Folders of NAME.onnx (+ NAME.json).")
    ap.add_argument("--models", default="", help="Only these names (comma separated).")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--duration", type=float, default=10.0, help="Seconds per measurement.")
    ap.add_argument(
        "--rounds", type=int, default=3, help="Interleaved rounds of every timing (order rotating)."
    )
    ap.add_argument("--calib-images", type=Path, default=SAMPLE / "calib.txt")
    ap.add_argument("--calib-count", type=int, default=200)
    ap.add_argument("--images", type=Path, default=SAMPLE / "val.txt", help="For agreement.")
    ap.add_argument("--agree-count", type=int, default=16)
    ap.add_argument("--select-budget", type=float, default=30.0)
    ap.add_argument("--work", type=Path, help="Scratch folder (default: a temporary one).")
    ap.add_argument("--md", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--title", default="Model breadth", help="The section (one per title).")
    a = ap.parse_args(argv)
    a.precisions = [p.strip() for p in a.precisions.split(",") if p.strip()]
    a.batches = [int(b) for b in a.batches.split(",")]
    if a.rounds < 1 or a.duration <= 0:
        ap.error("--rounds must be >= 1 and --duration > 0")
    return a


def main(argv: list[str] | None = None) -> int:
    from quench.evaluate import list_images

    a = parse_args(argv)
    a.work = a.work or Path(tempfile.mkdtemp(prefix="quench-zoo-"))
    a.work.mkdir(parents=True, exist_ok=True)
    only = {m.strip() for m in a.models.split(",") if m.strip()}
    models = sorted(p for d in a.dirs for p in d.glob("*.onnx") if not only or p.stem in only)
    if not models:
        raise SystemExit(f"no .onnx models in {', '.join(map(str, a.dirs))}")
    images = list_images(a.images)[: a.agree_count]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    entries = [run_model(m, a, images) for m in models]
    (a.work / "zoo.json").write_text(json.dumps(entries, indent=2, default=str))
    section = report(entries, a, started)
    write_section(a.md, section.split("\n", 1)[0], section)
    print(section)
    say(f"wrote the section to {a.md}; figures in {a.work / 'zoo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
