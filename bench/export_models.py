#!/usr/bin/env python3
"""Export modern classifiers to ONNX with random weights, for ``bench/zoo.py``.

Runs with a torch environment of its own, never Quench's (torch is no Quench dependency)::

    python3 -m venv /work/torchenv
    /work/torchenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm onnx onnxscript
    /work/torchenv/bin/python bench/export_models.py --out ~/.cache/quench/zoo-modern \
        [--models deit_small,...] [--opset 18] [--bn-images calib.txt --bn-count 32]

Each model is built with ``pretrained=False`` / ``weights=None`` (nothing is downloaded), seeded,
its BatchNorm statistics measured on photos (``--bn-images``) or random input
(``recalibrate_batchnorm``: freshly initialised ones make the logits vanish), and exported
with a dynamic batch axis. Beside each ``NAME.onnx`` goes ``NAME.json``: the data config
the architecture's published weights were trained with, read from the library itself
(torchvision's ``Weights.DEFAULT.transforms()``, timm's ``pretrained_cfg``), as Quench's build
flags (``--resize --crop --interpolation --mean --std``), so ``bench/zoo.py`` builds each with
the right preprocessing without torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# name: (library, constructor name, crop size)
MODELS: dict[str, tuple[str, str]] = {
    "deit_small": ("timm", "deit_small_patch16_224"),
    "vit_b_16": ("torchvision", "vit_b_16"),
    "convnext_tiny": ("torchvision", "convnext_tiny"),
    "mobilenet_v3_large": ("torchvision", "mobilenet_v3_large"),
    "regnet_y_400mf": ("torchvision", "regnet_y_400mf"),
    "swin_t": ("torchvision", "swin_t"),
    "inception_v3": ("torchvision", "inception_v3"),
}
DEFAULT = ("deit_small", "convnext_tiny", "mobilenet_v3_large", "regnet_y_400mf", "swin_t",
           "inception_v3")  # fmt: skip


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def torchvision_model(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The architecture with random weights, and its default weights' data config."""
    import torchvision.models as tvm

    kwargs = {"aux_logits": False, "init_weights": True} if name == "inception_v3" else {}
    model = tvm.get_model(name, weights=None, **kwargs)
    tf = tvm.get_model_weights(name).DEFAULT.transforms()  # a config object: no download
    size = tf.resize_size[0] if isinstance(tf.resize_size, list) else tf.resize_size
    data = {
        "resize": int(size),
        "crop": int(tf.crop_size[0]),
        "interpolation": tf.interpolation.value,
        "mean": [round(m * 255, 4) for m in tf.mean],
        "std": [round(s * 255, 4) for s in tf.std],
        "source": f"torchvision {name} Weights.DEFAULT.transforms()",
    }
    return model, data


def timm_model(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The architecture with random weights, and its pretrained_cfg's data config."""
    import timm

    model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    crop = int(cfg["input_size"][-1])
    data = {
        "resize": math.floor(crop / cfg["crop_pct"]),  # timm's resize for center crop
        "crop": crop,
        "interpolation": cfg["interpolation"],
        "mean": [round(m * 255, 4) for m in cfg["mean"]],
        "std": [round(s * 255, 4) for s in cfg["std"]],
        "source": f"timm {name} pretrained_cfg",
    }
    return model, data


LIBRARIES: dict[str, Callable[[str], tuple[torch.nn.Module, dict[str, Any]]]] = {
    "torchvision": torchvision_model,
    "timm": timm_model,
}


def flags(data: dict[str, Any]) -> list[str]:
    """``quench build`` flags for a data config."""
    return [
        "--resize", str(data["resize"]),
        "--crop", str(data["crop"]),
        "--interpolation", data["interpolation"],
        "--mean", ",".join(f"{v:g}" for v in data["mean"]),
        "--std", ",".join(f"{v:g}" for v in data["std"]),
    ]  # fmt: skip


def photo_batches(images: list[Path], data: dict[str, Any], batch: int = 8) -> list[torch.Tensor]:
    """``images`` preprocessed as the model's data config says, in batches."""
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([
        T.Resize(data["resize"], interpolation=T.InterpolationMode(data["interpolation"])),
        T.CenterCrop(data["crop"]),
        T.ToTensor(),
        T.Normalize([m / 255 for m in data["mean"]], [s / 255 for s in data["std"]]),
    ])  # fmt: skip
    xs = [tf(Image.open(p).convert("RGB")) for p in images]
    return [torch.stack(xs[i : i + batch]) for i in range(0, len(xs), batch)]


def recalibrate_batchnorm(model: torch.nn.Module, batches: list[torch.Tensor]) -> int:
    """Set every BatchNorm's running statistics to those of its input on ``batches``.

    Freshly initialised BatchNorms (mean 0, var 1) let activations shrink layer after layer:
    a random MobileNetV3's logits are ~1e-10 and the same for every input, which makes
    agreement and SQNR figures meaningless. With the statistics measured, every BatchNorm
    output is normalised and the logits depend on the input, as a trained model's do."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in batches if bns else []:
            model(x)
    model.eval()
    return len(bns)


def export(name: str, out: Path, opset: int, images: list[Path]) -> dict[str, Any]:
    lib, ctor = MODELS[name]
    torch.manual_seed(0)
    model, data = LIBRARIES[lib](ctor)
    crop = data["crop"]
    batches = photo_batches(images, data) if images else [torch.randn(8, 3, crop, crop)] * 4
    recalibrated = recalibrate_batchnorm(model, batches)
    seen = f"{len(images)} photos" if images else "random input"
    x = torch.randn(2, 3, data["crop"], data["crop"])
    dest = out / f"{name}.onnx"
    t0 = time.perf_counter()
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (x,),
            str(dest),
            input_names=["input"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
            optimize=True,
        )
    meta = {
        "model": f"{lib} {ctor}",
        "weights": "random (seed 0), pretrained=False"
        + (f"; {recalibrated} BatchNorm statistics measured on {seen}" if recalibrated else ""),
        "opset": opset,
        "data": data,
        "build_flags": flags(data),
        "export_seconds": round(time.perf_counter() - t0, 1),
    }
    dest.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="Folder for NAME.onnx + NAME.json.")
    ap.add_argument("--models", default=",".join(DEFAULT), help=f"From: {', '.join(MODELS)}.")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument(
        "--bn-images",
        type=Path,
        help="List file of photos (one path a line) to measure BatchNorm statistics on, so the "
        "activations on photos are normalised as a trained model's (default: random input).",
    )
    ap.add_argument("--bn-count", type=int, default=32, help="Photos taken from --bn-images.")
    args = ap.parse_args(argv)
    images: list[Path] = []
    if args.bn_images:
        base = args.bn_images.parent
        lines = [ln.strip() for ln in args.bn_images.read_text().splitlines() if ln.strip()]
        images = [base / ln if not Path(ln).is_absolute() else Path(ln) for ln in lines]
        images = images[: args.bn_count]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in names:
        say(f"{name}: exporting")
        try:
            meta = export(name, args.out, args.opset, images)
        except Exception as exc:  # one line per model; the others still export
            failed += 1
            say(f"{name}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        say(f"{name}: {meta['export_seconds']} s, {' '.join(meta['build_flags'])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
