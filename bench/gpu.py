"""torch-cuda on a GPU: ResNet-50 replica speed per mode and batch (compiled vs eager, compute
and host-to-device copy timed apart), and efficientnet-lite0's top-1 agreement with ONNX
Runtime fp32 on the CPU (what the CPU fp32 artifact computes) on real val images.

Made for one call on a lent H200 (< 8 min; needs only torch, onnx, onnxruntime, numpy there):

    # here, once: the val pixels and lite0 into a carried folder (.gpu-data/, git-ignored)
    python bench/gpu.py --make-pixels ../shared/data/imagenet-sample/val.txt:200 \\
        --pixels .gpu-data/val200.npy && cp ../shared/models/efficientnet-lite0.onnx .gpu-data/
    # on the device (carry .gpu-data):
    PYTHONPATH=src python3 bench/gpu.py --out $OUT --lite0 .gpu-data/efficientnet-lite0.onnx \\
        --pixels .gpu-data/val200.npy

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
    run.infer(feed)  # compiles this bucket where compiling
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
    macs = count_macs(model)
    data = model.SerializeToString()
    rows = []
    for mode in args.modes:
        float_type = MODES[mode]
        ceiling = matmul_ceiling(getattr(torch, float_type), args.device)
        for compiled in (False, True) if args.compile else (False,):
            batches = args.compiled_batches if compiled else args.batches
            run = TorchRunner(data, args.device, float_type, compile=compiled)
            with run:
                for b in batches:
                    if compiled and time.monotonic() > deadline:
                        rows.append({"mode": mode, "compiled": True, "batch": b, "skipped": True})
                        continue
                    row = measure(run, b, args.seconds)
                    share = 2 * macs * row["compute_qps"] / ceiling
                    rows.append(
                        {"mode": mode, "compiled": compiled, **row, "share_of_matmul_peak": share}
                    )
                    print(json.dumps(rows[-1]), flush=True)
        rows.append({"mode": mode, "matmul_tflops": ceiling / 1e12})
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
    for r in rows:
        if "qps" not in r:
            continue
        graph = "compiled + CUDA graph" if r["compiled"] else "eager"
        comp = f"{r['compile_s']:.0f}" if r.get("compile_s") else "-"
        lines.append(
            f"| {r['mode']} | {graph} | {r['batch']} | {r['qps']:.0f} | {r['p50_ms']:.2f} / "
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
    ap.add_argument("--compiled-batches", type=ints, default=[1, 8, 256])
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--seconds", type=float, default=1.5, help="timed per row")
    ap.add_argument("--budget-s", type=float, default=420, help="compiled rows stop after it")
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
