#!/usr/bin/env python3
"""Fused preprocessing: end-to-end images/s of ``--input uint8`` artifacts against
``--input float32`` ones, fp32 and INT8, with each one's engine-only images/s beside it.

In one run: builds (or takes from ``--artifacts``) four artifacts of one model, fp32 and INT8,
each with float32 and with uint8 input; then, in alternating rounds (the four in a rotating
order, each timed engine-only and end to end back to back), measures at one batch size:

- engine-only: random batches through the engine for ``--duration`` seconds (``quench perf``);
- end to end: one pass of the image pipeline over the images (``quench perf --images``:
  decode, resize, crop, normalise or not, infer, top-5);

then prints a markdown table (medians over the rounds; pipeline / engine-only; uint8 / float32
paired by round, with its 95% CI) and the machine, and writes it to BENCHMARKS.md between
``<!-- fused -->`` markers.

    .venv/bin/python bench/fused.py [--model ../shared/models/efficientnet-lite0.onnx
        --preset efficientnet-lite0] [--calib-images calib.txt] [--images val.txt]
        [--count 400] [--batch 8] [--rounds 5] [--duration 5] [--engine openvino]
        [--artifacts DIR] [--work DIR] [--md BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import write_section

from quench.builder import BuildOptions, build
from quench.evaluate import list_images
from quench.hw import cpu_info
from quench.model import Model
from quench.perf import perf_images, perf_model
from quench.stats import compare

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"
MARK = "<!-- fused -->"
INPUTS = ("float32", "uint8")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def artifacts(a: argparse.Namespace, work: Path) -> dict[tuple[str, str], Path]:
    """``(build, input) -> artifact``: taken from ``--artifacts`` (``fp32-float32.quench``,
    ``fp32-uint8.quench``, ``int8-float32.quench``, ``int8-uint8.quench``) or built."""
    out = {}
    for label, precision in (("fp32", "force_float32"), ("int8", a.int8)):
        for kind in INPUTS:
            name = f"{label}-{kind}.quench"
            if a.artifacts:
                path = a.artifacts / name
                if not path.is_file():
                    raise SystemExit(f"{path}: not found (--artifacts needs {name})")
            else:
                path = work / name
                say(f"building {name} ({precision}, --input {kind}, --engine {a.engine})")
                int8 = label == "int8"
                opts = BuildOptions(
                    precision=precision,
                    preset=a.preset,
                    engine=a.engine,
                    input=kind,
                    calib_images=str(a.calib_images) if int8 else None,
                    calib_count=a.calib_count,
                    check_images=str(a.check_images) if a.check_images else None,
                    check_labels=str(a.check_labels) if a.check_labels else None,
                    progress=False,
                )
                build(a.model, path, opts, log=lambda s: say(f"  {s}")).close()
            out[(label, kind)] = path
    return out


def measure(models: dict[tuple[str, str], Model], files: list[Path], a: argparse.Namespace):
    """Per artifact, the engine-only and end-to-end images/s of every round."""
    keys = list(models)
    figures: dict[tuple[str, str], dict[str, list[float]]] = {
        k: {"engine": [], "pipeline": []} for k in keys
    }
    say("warming up: one pass of each artifact over the images (and the page cache)")
    for k in keys:
        perf_images(models[k], files, a.batch, naive=False, progress=False)
    for r in range(a.rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]  # rotate who goes first
        for k in order:
            m = models[k]
            (res,) = perf_model(
                m, [a.batch], duration=a.duration, warmup=5, rounds=1, progress=False
            )
            e2e = perf_images(m, files, a.batch, naive=False, progress=False)["pipeline"]
            if e2e["failed"]:
                raise SystemExit(f"{e2e['failed']} images could not be read")
            figures[k]["engine"].append(res.qps)
            figures[k]["pipeline"].append(e2e["images_per_s"])
        line = "; ".join(
            f"{'-'.join(k)} {figures[k]['engine'][-1]:.1f} / {figures[k]['pipeline'][-1]:.1f}"
            for k in keys
        )
        say(f"round {r + 1}/{a.rounds} (engine-only / end-to-end images/s): {line}")
    return figures


def ratio(a: list[float], b: list[float]) -> dict[str, Any]:
    """a / b over paired rounds: geometric mean and 95% CI (quench.stats.compare)."""
    c = compare(a, b, paired=True)
    return {"ratio": c.ratio, "low": c.low, "high": c.high, "winner": c.winner}


def summarize(figures: dict[tuple[str, str], dict[str, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    for (label, kind), f in figures.items():
        row: dict[str, Any] = {
            "build": label,
            "input": kind,
            "engine_only": float(np.median(f["engine"])),
            "pipeline": float(np.median(f["pipeline"])),
            "pipeline_vs_engine": ratio(f["pipeline"], f["engine"]),
            "rounds": f,
        }
        if kind == "uint8":
            base = figures[(label, "float32")]
            row["uint8_vs_float32"] = {
                "engine_only": ratio(f["engine"], base["engine"]),
                "pipeline": ratio(f["pipeline"], base["pipeline"]),
            }
        rows.append(row)
    return rows


def x(r: dict[str, Any]) -> str:
    tie = " (tie)" if r["winner"] == "tie" else ""
    return f"{r['ratio']:.2f}x [{r['low']:.2f}-{r['high']:.2f}]{tie}"


def report(
    rows: list[dict[str, Any]],
    models: dict[tuple[str, str], Model],
    a: argparse.Namespace,
    n: int,
) -> str:
    cpu = cpu_info()
    flags = ", ".join(str(f) for f in cpu["flags"]) or "no AVX2"  # type: ignore[attr-defined]
    lines = [
        MARK,
        "## Fused preprocessing: `--input uint8` against `--input float32`",
        "",
        f"Produced {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `.venv/bin/python "
        f"bench/fused.py --batch {a.batch} --rounds {a.rounds} --duration {a.duration:g} "
        f"--engine {a.engine}` on {cpu['model']} ({cpu['cores']} cores; "
        f"{flags}): `{Path(a.model).name}`, fp32 and INT8 "
        f"(`{a.int8}`), batch {a.batch}, {n} images of `{a.images.name}`. {a.rounds} "
        "alternating rounds; in each, every artifact (rotating order) is timed engine-only "
        f"({a.duration:g} s of random batches, as `quench perf`) and end to end (one pass of "
        "the pipeline over the images, as `quench perf --images`: decode, resize, crop, "
        "normalise or not, infer, top-5). Figures are medians over the rounds; ratios are "
        "geometric means of the per-round ratios with their 95% CI (paired by round; "
        "`(tie)`: within the noise).",
        "",
        "| build | input | engine | engine-only images/s | end-to-end images/s | "
        "end-to-end / engine-only | uint8 / float32 engine-only | uint8 / float32 end-to-end |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = models[(r["build"], r["input"])]
        vs = r.get("uint8_vs_float32")
        lines.append(
            f"| {r['build']} | {r['input']} | {m.engine} | {r['engine_only']:.1f} | "
            f"{r['pipeline']:.1f} | {x(r['pipeline_vs_engine'])} | "
            f"{x(vs['engine_only']) if vs else ''} | {x(vs['pipeline']) if vs else ''} |"
        )
    acc = [
        f"{'-'.join(k)} top-1 {m.manifest['accuracy']['built']['top1']:.4f}"
        for k, m in models.items()
        if m.manifest.get("accuracy")
    ]
    if acc:
        lines += ["", "Build-time accuracy check: " + "; ".join(acc) + "."]
    int8 = next(r for r in rows if (r["build"], r["input"]) == ("int8", "uint8"))
    lines += [
        "",
        f"INT8 with uint8 input: end to end at {x(int8['pipeline_vs_engine'])} of "
        f"engine-only at batch {a.batch} (target: >= 0.9x).",
        MARK,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "efficientnet-lite0.onnx")
    ap.add_argument("--preset", default="efficientnet-lite0")
    ap.add_argument("--int8", default="qint8_mixed_float16", help="the INT8 precision mode")
    ap.add_argument("--calib-images", type=Path, default=SAMPLE / "calib.txt")
    ap.add_argument("--calib-count", type=int, default=200)
    ap.add_argument("--check-images", type=Path, help="build-time accuracy check (top-1)")
    ap.add_argument("--check-labels", type=Path)
    ap.add_argument("--images", type=Path, default=SAMPLE / "val.txt", help="timed end to end")
    ap.add_argument("--count", type=int, default=400, help="images of --images timed")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=5.0, help="engine-only s per round")
    ap.add_argument(
        "--engine",
        default="openvino",
        help="pinned, so each precision's float32 and uint8 builds run the same engine",
    )
    ap.add_argument("--artifacts", type=Path, help="take the four artifacts from this folder")
    ap.add_argument("--work", type=Path, help="where to build them (default: a temporary one)")
    ap.add_argument("--md", type=Path, default=REPO / "BENCHMARKS.md")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="quench-fused-"))
    work.mkdir(parents=True, exist_ok=True)
    files = list_images(a.images)[: a.count]
    if not files:
        raise SystemExit(f"{a.images}: no images")
    paths = artifacts(a, work)
    models = {k: Model.load(p) for k, p in paths.items()}
    try:
        figures = measure(models, files, a)
        rows = summarize(figures)
        section = report(rows, models, a, len(files))
    finally:
        for m in models.values():
            m.close()
    doc = {"machine": cpu_info(), "batch": a.batch, "images": len(files), "rows": rows}
    (work / "fused.json").write_text(json.dumps(doc, indent=2, default=str))
    write_section(a.md, MARK, section)
    print(section)
    say(f"wrote the section to {a.md}; figures in {work / 'fused.json'}")


if __name__ == "__main__":
    main()
