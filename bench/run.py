#!/usr/bin/env python3
"""Peers vs Quench on one machine, in one run: writes BENCHMARKS.md.

Measures, on the ResNet-50 v1 replica and at each batch size: plain ONNX Runtime (fp32, and the
ORT INT8 route: quant_pre_process + quantize_static QDQ), OpenVINO's own ``benchmark_app``
(f32 pinned, its default hint, bf16 pinned), OpenVINO + NNCF INT8 (default parameters), and
``quench build`` + ``quench perf`` in every precision mode; then ``quench serve`` under load,
the end-to-end pipeline on real JPEGs and the peak memory of ``quench infer``. Quench's
artifacts are built first; each family's Quench timings then directly follow its peers'.
Every number in the report comes from this run; failures are recorded, never fatal.

    .venv/bin/python bench/run.py [--batches 1,4,8] [--duration 10] [--only fp32,bf16,int8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from common import REPO, Runner, loadavg
from r50.config import DEFAULT_CALIB, DEFAULT_VAL, FAMILIES, FAMILY_ALIASES, QUENCH_BUILDS, say
from r50.extras import (
    accuracy_lines,
    machine_table,
    memory_entries,
    peer_peak_shares,
    pipeline_entries,
    serving_entries,
)
from r50.measure import Bench
from r50.report import write_report
from r50.rows import (
    benchmark_app_rows,
    build_quench,
    capped_rows,
    make_replica,
    measure_machine_clock,
    nncf_int8_rows,
    openvino_default_precision,
    ort_fp32_row,
    ort_int8_row,
    quench_rows,
)
from r50.steps import nncf_int8_step, ort_int8_step, rss_step

from quench.hw import default_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,4,8", help="Batch sizes, comma separated.")
    ap.add_argument("--duration", type=float, default=10.0, help="Seconds per measurement.")
    ap.add_argument("--calib-images", type=Path, default=DEFAULT_CALIB, help="INT8 calibration.")
    ap.add_argument("--calib-count", type=int, default=200)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work", help="Scratch dir.")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--only", default="fp32,bf16,int8", help="Families: fp32,bf16,int8.")
    ap.add_argument(
        "--serve-duration",
        type=float,
        default=60.0,
        help="Seconds of the quench serve load test (16 clients) per artifact; 0 skips it.",
    )
    ap.add_argument(
        "--images",
        type=Path,
        default=DEFAULT_VAL,
        help="JPEGs for the end-to-end pipeline and memory measurements (folder or list).",
    )
    ap.add_argument(
        "--memory-images",
        type=int,
        default=10000,
        help="Images (--images repeated) for the peak-memory run of quench infer; 0 skips it.",
    )
    ap.add_argument(
        "--isa-caps",
        default="",
        help="Also run the INT8 rows with OpenVINO capped at these ONEDNN_MAX_CPU_ISA values "
        "(comma separated, e.g. AVX2,AVX512_CORE): the same artifacts on older CPU classes.",
    )
    ap.add_argument(
        "--accuracy",
        action="store_true",
        help="Also run bench/accuracy.py (INT8 top-1 on real models per CPU class, --isa-caps).",
    )
    ap.add_argument("--step", choices=("ort-int8", "nncf-int8", "rss"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--cmd", help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.batch_list = sorted({int(v) for v in args.batches.split(",") if v.strip()})
    except ValueError:
        ap.error(f"--batches takes sizes like 1,4,8, got {args.batches!r}")
    if not args.batch_list or min(args.batch_list) < 1:
        ap.error("--batches takes sizes >= 1")
    fams = {FAMILY_ALIASES.get(v.strip().lower()) for v in args.only.split(",") if v.strip()}
    if None in fams or not fams:
        ap.error(f"--only takes fp32,bf16,int8, got {args.only!r}")
    args.families = [f for f in FAMILIES if f in fams]
    if args.duration <= 0 or args.calib_count < 1:
        ap.error("--duration must be > 0 and --calib-count >= 1")
    args.isa_caps = [v.strip().upper() for v in args.isa_caps.split(",") if v.strip()]
    args.work = args.work.absolute()
    args.out = args.out.absolute()
    args.calib_images = args.calib_images.absolute()
    args.images = args.images.absolute()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        return STEPS[args.step](args)
    started = datetime.now(timezone.utc)
    args.work.mkdir(parents=True, exist_ok=True)
    say(
        f"work dir {args.work}; families {','.join(args.families)}; batches {args.batch_list}; "
        f"{args.duration:g} s each"
    )
    load_start = loadavg()
    env = dict(os.environ)
    clock = measure_machine_clock(args, env)
    b = Bench(args, Runner(args.work, env, say=say), args.work / "resnet50-replica.onnx")
    macs = make_replica(b)
    ov_default = openvino_default_precision()
    # Quench builds first, so that below each family's Quench timings follow its peers' with
    # nothing in between (this machine's speed drifts by several percent over minutes)
    b.built = [build_quench(b, q) for q in QUENCH_BUILDS if q.family in b.families]
    if "fp32" in b.families:
        ort_fp32_row(b)
    for group in ("fp32", "bf16"):
        benchmark_app_rows(b, group, ov_default)
        quench_rows(b, group)
    if "int8" in b.families:
        ort_int8_row(b)
        nncf_int8_rows(b)
    quench_rows(b, "int8")
    for cap in args.isa_caps if "int8" in b.families else []:
        capped_rows(b, cap)
    b.serving = serving_entries(b)
    b.pipeline = pipeline_entries(b)
    b.memory = memory_entries(b)
    b.accuracy = accuracy_lines(b)
    threads = default_threads()
    peer_peak_shares(b.rows, macs, threads)
    machine = machine_table(clock, macs, threads, ov_default, load_start)
    results = {"rows": [r.__dict__ for r in b.rows], "preps": [p.__dict__ for p in b.preps]}
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_report(b, machine, started)
    say(f"wrote {args.out}")
    return 0


STEPS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ort-int8": ort_int8_step,
    "nncf-int8": nncf_int8_step,
    "rss": rss_step,
}

if __name__ == "__main__":
    sys.exit(main())
