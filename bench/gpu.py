"""torch-cuda on a GPU: ResNet-50 replica speed per mode and batch (compiled vs eager, compute
and host-to-device copy timed apart), and efficientnet-lite0's top-1 agreement with ONNX
Runtime fp32 on the CPU (what the CPU fp32 artifact computes) on real val images.

Made for one call on a lent H200 (needs only torch, onnx, onnxruntime, numpy there), through
``bench/gpu_device.sh`` (the GPU tests, then this; under 9 min with the default budgets):

    # here, once: val pixels, lite0 and the wheels the device image lacks, into .gpu-data/
    python bench/gpu.py --make-pixels ../shared/data/imagenet-sample/val.txt:200 \
        --pixels .gpu-data/val200.npy && cp ../shared/models/efficientnet-lite0.onnx .gpu-data/
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu-data/whl cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
    # on the device (carry [".gpu-data"], timeout_s 570):
    bash bench/gpu_device.sh

It writes ``gpu.json`` (every figure) and ``BENCHMARKS.md`` (this repository's, with its "GPU"
section replaced) under ``--out``. Smoke on the CPU: ``--device cpu --no-compile --tiny``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_section

from quench.backend.onnxruntime.session import session
from quench.backend.torch.device import describe
from quench.backend.torch.runner import TorchRunner
from quench.canonical import canonical
from quench.zoo.synth import count_macs, synth_resnet50_v1

MARK = "<!-- bench/gpu.py -->"
MODES = {"force_float32": "float32", "force_float16": "float16", "force_bfloat16": "bfloat16"}
LITE0_MEAN, LITE0_STD = 127.5, 128.0


def matmul_ceiling(dtype: torch.dtype, device: str, n: int = 4096) -> float:
    """Measured dense matrix-product rate (FLOP/s) in ``dtype``: the share-of-peak ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(run: TorchRunner, batch: int, seconds: float) -> dict[str, Any]:
    """qps and latency of whole calls (copies included); compute-only and copy times apart."""
    x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    feed = {run.module.input_names[0]: x}
    for _ in range(3):  # compiles this bucket where compiling, records its CUDA graph
        run.infer(feed)
    lat, copy, compute = [], [], []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(lat) < 5:
        t0 = time.perf_counter()
        xs = run.to_device(feed)
        sync(run.device)
        t1 = time.perf_counter()
        outs = run.compute(xs)
        sync(run.device)
        t2 = time.perf_counter()
        run.to_host(outs, batch)
        t3 = time.perf_counter()
        lat.append(t3 - t0)
        copy.append(t1 - t0)
        compute.append(t2 - t1)
    p = np.percentile(np.array(lat) * 1e3, [50, 90, 99])
    return {
        "batch": batch,
        "calls": len(lat),
        "qps": batch * len(lat) / sum(lat),
        "p50_ms": p[0],
        "p90_ms": p[1],
        "p99_ms": p[2],
        "compute_ms": float(np.median(compute) * 1e3),
        "h2d_ms": float(np.median(copy) * 1e3),
        "compute_qps": batch / float(np.median(compute)),
        "compile_s": run.compile_seconds.get(batch),
    }


def speed(args: argparse.Namespace, model: onnx.ModelProto, deadline: float) -> list[dict]:
    """Eager rows for every mode and batch first (cheap), then compiled rows batch by batch
    across the modes (``--compiled-batches`` order), until the compile budget is spent."""
    macs = count_macs(model)
    data = model.SerializeToString()
    ceilings = {m: matmul_ceiling(getattr(torch, MODES[m]), args.device) for m in args.modes}
    rows: list[dict] = [{"mode": m, "matmul_tflops": c / 1e12} for m, c in ceilings.items()]

    def row(run: TorchRunner, mode: str, b: int, compiled: bool) -> None:
        r = measure(run, b, args.seconds)
        share = 2 * macs * r["compute_qps"] / ceilings[mode]
        rows.append({"mode": mode, "compiled": compiled, **r, "share_of_matmul_peak": share})
        print(json.dumps(rows[-1]), flush=True)

    for mode in args.modes:
        with TorchRunner(data, args.device, MODES[mode], compile=False) as run:
            for b in args.batches:
                row(run, mode, b, False)
    if not args.compile:
        return rows
    runners = {m: TorchRunner(data, args.device, MODES[m], compile=True) for m in args.modes}
    try:
        for b in args.compiled_batches:
            for mode, run in runners.items():
                if time.monotonic() > deadline:
                    rows.append({"mode": mode, "compiled": True, "batch": b, "skipped": True})
                    continue
                row(run.activate(), mode, b, True)
    finally:
        for run in runners.values():
            run.deactivate()
    return rows


def agreement(args: argparse.Namespace) -> list[dict]:
    """Top-1 agreement of each mode (eager) with ONNX Runtime fp32 on the CPU, lite0."""
    model = onnx.load(args.lite0)
    pixels = np.load(args.pixels)
    x = ((pixels.astype(np.float32) - LITE0_MEAN) / LITE0_STD).transpose(0, 3, 1, 2).copy()
    name = model.graph.input[0].name
    ref = session(model, optimization="disable").run(None, {name: x})[0].argmax(1)
    out = []
    for mode in args.modes:
        with TorchRunner(model.SerializeToString(), args.device, MODES[mode], False) as run:
            got = np.concatenate(
                [
                    run.infer({name: x[i : i + 64]})[run.module.output_names[0]].argmax(1)
                    for i in range(0, len(x), 64)
                ]
            )
        out.append({"mode": mode, "images": len(x), "top1_agreement": float(np.mean(got == ref))})
        print(json.dumps(out[-1]), flush=True)
    return out


def markdown(facts: dict, rows: list[dict], agree: list[dict]) -> str:
    lines = [
        MARK,
        "## GPU (torch-cuda)",
        "",
        f"`bench/gpu.py` on {facts.get('gpu', facts['device'])} (driver {facts.get('driver')}, "
        f"CUDA {facts.get('cuda')}, torch {facts['torch']}); ResNet-50 replica, random input. "
        "qps and percentiles: whole calls (host-to-device copy, compute, copy back); compute: "
        "the device part alone; share: compute-only FLOP/s over a measured matrix product in "
        "the same type (fp32: TF32 off).",
        "",
        "| mode | graph | batch | qps | p50 / p99 ms | compute ms | H2D ms | share | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(MODES)
    cuda_graph = " + CUDA graphs" if str(facts["device"]).startswith("cuda") else ""
    timed = sorted(
        (r for r in rows if "compiled" in r),
        key=lambda r: (order.index(r["mode"]), r["compiled"], r["batch"]),
    )
    for r in timed:
        if r.get("skipped"):
            lines.append(f"| {r['mode']} | compiled | {r['batch']} | not run: budget spent |||||")
            continue
        graph = "eager" if not r["compiled"] else "compiled" + cuda_graph
        qps = f"{r['qps']:.0f}" if r["qps"] >= 100 else f"{r['qps']:.2f}"
        comp = f"{r['compile_s']:.0f}" if r.get("compile_s") else "-"
        lines.append(
            f"| {r['mode']} | {graph} | {r['batch']} | {qps} | {r['p50_ms']:.2f} / "
            f"{r['p99_ms']:.2f} | {r['compute_ms']:.2f} | {r['h2d_ms']:.2f} | "
            f"{r['share_of_matmul_peak']:.1%} | {comp} |"
        )
    if agree:
        lines += ["", "efficientnet-lite0 top-1 agreement with ONNX Runtime fp32 on the CPU:", ""]
        lines += [f"- {a['mode']}: {a['top1_agreement']:.1%} of {a['images']}" for a in agree]
    return "\n".join([*lines, "", MARK]) + "\n"


def make_pixels(spec: str, out: Path) -> None:
    from quench.imaging import load_pixels
    from quench.presets import get_preset

    listing, count = spec.rsplit(":", 1)
    root = Path(listing).parent
    files = [root / f for f in Path(listing).read_text().split()[: int(count)]]
    data = get_preset("efficientnet-lite0").data
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.stack([load_pixels(f, data) for f in files]))
    print(f"wrote {out}: {len(files)} images")


def main() -> None:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    ap.add_argument("--batches", type=ints, default=[1, 8, 64, 256])
    ap.add_argument("--compiled-batches", type=ints, default=[8, 256, 1, 64])
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--seconds", type=float, default=1.5, help="timed per row")
    ap.add_argument("--budget-s", type=float, default=300, help="no compile starts after it")
    ap.add_argument("--lite0", help="efficientnet-lite0.onnx (agreement; skipped without)")
    ap.add_argument("--pixels", type=Path, help="uint8 (N, 224, 224, 3) val pixels, .npy")
    ap.add_argument("--make-pixels", metavar="VAL_TXT:N", help="write --pixels here and stop")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: batches 1,2, short rows")
    args = ap.parse_args()
    if args.make_pixels:
        return make_pixels(args.make_pixels, args.pixels)
    if args.tiny:
        args.batches, args.compiled_batches, args.seconds = [1, 2], [1], 0.2
    deadline = time.monotonic() + args.budget_s
    facts = describe(args.device)
    model, _ = canonical(synth_resnet50_v1(seed=0))
    rows = speed(args, model, deadline)
    agree = agreement(args) if args.lite0 and args.pixels else []
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"facts": facts, "speed": rows, "agreement": agree}
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1, default=str))
    md = args.out / "BENCHMARKS.md"
    md.write_text((Path(__file__).parents[1] / "BENCHMARKS.md").read_text())
    write_section(md, MARK, markdown(facts, rows, agree))
    print(markdown(facts, rows, agree))


if __name__ == "__main__":
    main()
