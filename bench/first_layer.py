#!/usr/bin/env python3
"""How the INT8 first layer is treated vs accuracy: the README's first-layer table.

Quantizes an ImageNet classifier three ways (float first layer; first conv on the pixel grid
rounded to nearest; on the pixel grid with GPTQ rounding) and reports, through OpenVINO (f32
elsewhere), the KL divergence to fp32 cross-validated on the calibration images (calibrate on
one half, measure on the other, both ways), and on the validation images for builds calibrated
on 4 random subsets of 150 calibration images (KL and top-1). Never touches val for choices.

    .venv/bin/python bench/first_layer.py [--model ../shared/models/efficientnet-lite0.onnx]
        [--preset efficientnet-lite0] [--data ../shared/data/imagenet-sample]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import openvino as ov

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from quench.backend.onnxruntime.loader import optimize  # noqa: E402
from quench.builder.quantize import QuantConfig, first_layer, quantize  # noqa: E402
from quench.graph import set_batch, upgrade_opset  # noqa: E402
from quench.hw import one_blas_thread  # noqa: E402
from quench.imaging import Normalizer, load_pixels  # noqa: E402
from quench.presets import DataConfig, get_preset  # noqa: E402


def images(
    data: Path, listing: str, norm: Normalizer, cfg: DataConfig
) -> tuple[np.ndarray, list[str]]:
    files = [ln.strip() for ln in (data / listing).read_text().splitlines() if ln.strip()]
    return norm.batch([load_pixels(data / f, cfg) for f in files]), files


@contextlib.contextmanager
def rounded_to_nearest() -> Iterator[None]:
    """Quantize with the pixel-grid Conv's weights as ONNX Runtime rounds them (to nearest):
    the GPTQ re-rounding skipped (Quench itself always applies it on the pixel grid)."""
    gptq = first_layer.gptq_first_layer
    first_layer.gptq_first_layer = lambda *args: None
    try:
        yield
    finally:
        first_layer.gptq_first_layer = gptq


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl(ref: np.ndarray, got: np.ndarray) -> float:
    lp, lq = log_softmax(ref), log_softmax(got)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", type=Path, default=ROOT.parent / "shared/models/efficientnet-lite0.onnx"
    )
    ap.add_argument("--preset", default="efficientnet-lite0")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/imagenet-sample")
    args = ap.parse_args()

    one_blas_thread()  # GPTQ's NumPy beside OpenVINO, for the whole script (quench.hw)
    started = time.perf_counter()
    cfg = get_preset(args.preset).data
    norm = Normalizer(cfg)
    calib, _ = images(args.data, "calib.txt", norm, cfg)
    val, files = images(args.data, "val.txt", norm, cfg)
    rows = (ln.split("\t") for ln in (args.data / "ground_truth.tsv").read_text().splitlines()[1:])
    truth = {f: int(i) for f, i in rows}
    y = np.array([truth[f] for f in files])

    src = onnx.load(str(args.model))
    model = optimize(upgrade_opset(set_batch(src, None), 13), level="basic")
    name = next(i.name for i in model.graph.input)
    core = ov.Core()

    def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
        c = core.compile_model(
            core.read_model(m.SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
        r = c.create_infer_request()
        return np.concatenate(
            [r.infer({0: x[i : i + 100]})[0].copy() for i in range(0, len(x), 100)]
        )

    grid = cfg.channel_mean_std()
    on_grid = QuantConfig(float_first_layer=False, input_grid=grid)
    configs = {  # label: (config, context to quantize in)
        "float (`--float-first-layer`)": (QuantConfig(), contextlib.nullcontext),
        "pixel grid, rounded to nearest": (on_grid, rounded_to_nearest),
        "pixel grid, GPTQ (default)": (on_grid, contextlib.nullcontext),
    }
    fp_val = run(model, val)
    print(f"fp32 top-1 on val: {int((fp_val.argmax(1) == y).sum())} / {len(y)}", file=sys.stderr)
    perm = np.random.default_rng(0).permutation(len(calib))
    halves = [np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])]
    fp_halves = [run(model, calib[h]) for h in halves]
    rng = np.random.default_rng(1)
    subsets = [np.sort(rng.choice(len(calib), 150, replace=False)) for _ in range(4)]

    print(
        "| first layer | cross-validated KL on calib (2 halves) | val KL, 4 subsets (mean) "
        "| val top-1, those 4 builds |"
    )
    print("|---|---:|---:|---|")
    for label, (qc, context) in configs.items():
        cv = []
        for a, b in ((0, 1), (1, 0)):
            with context():
                q = quantize(model, name, calib[halves[a]], qc).model
            cv.append(kl(fp_halves[b], run(q, calib[halves[b]])))
        kls, top1 = [], []
        for s in subsets:
            with context():
                qs = quantize(model, name, calib[s], qc).model
            out = run(qs, val)
            kls.append(kl(fp_val, out))
            top1.append(int((out.argmax(1) == y).sum()))
        print(
            f"| {label} | {np.mean(cv):.5f} | {np.mean(kls):.5f} | {', '.join(map(str, top1))} |",
            flush=True,
        )
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
