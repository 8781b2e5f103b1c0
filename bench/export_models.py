#!/usr/bin/env python3
"""Export modern classifiers to ONNX with random weights, for ``bench/zoo.py``.

Runs with a torch environment of its own, never Quench's (torch is no Quench dependency)::

    python3 -m venv /work/torchenv
    /work/torchenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm onnx onnxscript
    /work/torchenv/bin/python bench/export_models.py --out ~/.cache/quench/zoo-modern \
        [--models deit_small,convnext_tiny,...] [--opset 18]

Each model is built with ``pretrained=False`` / ``weights=None`` (nothing is downloaded), seeded,
its BatchNorm statistics measured on random input (``recalibrate_batchnorm``: freshly
initialised ones make the logits vanish), and exported with a dynamic batch axis. Beside each ``NAME.onnx`` goes ``NAME.json``: the data
config the architecture's published weights were trained with, read from the library itself
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
        "resize": int(math.floor(crop / cfg["crop_pct"])),  # timm's resize for center crop
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


def recalibrate_batchnorm(model: torch.nn.Module, crop: int, batches: int = 4) -> int:
    """Set every BatchNorm's running statistics to those of its input on random images.

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
        for _ in range(batches if bns else 0):
            model(torch.randn(8, 3, crop, crop))
    model.eval()
    return len(bns)


def export(name: str, out: Path, opset: int) -> dict[str, Any]:
    lib, ctor = MODELS[name]
    torch.manual_seed(0)
    model, data = LIBRARIES[lib](ctor)
    recalibrated = recalibrate_batchnorm(model, data["crop"])
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
        + (f"; {recalibrated} BatchNorm statistics measured on random input" if recalibrated else ""),
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
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in names:
        say(f"{name}: exporting")
        try:
            meta = export(name, args.out, args.opset)
        except Exception as exc:  # one line per model; the others still export
            failed += 1
            say(f"{name}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        say(f"{name}: {meta['export_seconds']} s, {' '.join(meta['build_flags'])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
