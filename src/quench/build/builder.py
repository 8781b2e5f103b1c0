"""The build steps: load + check -> resolve preset -> set batch -> compile -> verify -> save."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quench import __version__, artifact
from quench.backend import CompileSpec, get_engine
from quench.errors import ModelError, QuenchError
from quench.graph import find_io, load_model, num_classes, set_batch
from quench.hw import cpu_info
from quench.labels import load_labels
from quench.presets import Preset, detect_preset, get_preset

if TYPE_CHECKING:
    from quench.model import Model

PRECISIONS = ("force_float32",)


@dataclass
class BuildOptions:
    """Everything ``quench build`` takes besides the model and output paths."""

    precision: str = "force_float32"
    preset: str | None = None
    name: str | None = None
    labels: str | None = None  # label file or built-in label set
    batch: int | None = None  # fixed batch size; None = dynamic (mutable) batch
    engine: str = "onnxruntime"
    threads: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: int | None = None
    crop: int | None = None
    interpolation: str | None = None
    channel_order: str | None = None
    layout: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_preset(opts: BuildOptions, input_name: str, output_name: str) -> tuple[Preset, str]:
    """The preset to use and how it was chosen (named, detected or generic)."""
    if opts.preset:
        preset, how = get_preset(opts.preset), "named"
    else:
        found = detect_preset(input_name, output_name)
        preset, how = (found, "detected") if found else (get_preset("imagenet"), "generic")
    preset = preset.with_data(
        mean=opts.mean,
        std=opts.std,
        resize=opts.resize,
        crop=opts.crop,
        interpolation=opts.interpolation,
        channel_order=opts.channel_order,
        layout=opts.layout,
    )
    return preset, how


def build(
    model: str | Path,
    output: str | Path,
    options: BuildOptions | None = None,
    log: Any = None,
    **kwargs: Any,
) -> Model:
    """Build ``model`` into the artifact ``output`` and return it loaded."""
    from quench.model import Model

    opts = options or BuildOptions(**kwargs)
    say = log or (lambda msg: None)
    started = time.perf_counter()
    if opts.precision not in PRECISIONS:
        raise QuenchError(
            f"unknown precision {opts.precision!r}; choose one of {', '.join(PRECISIONS)}"
        )
    if opts.batch is not None and opts.batch < 1:
        raise QuenchError(f"batch size must be >= 1, got {opts.batch}")

    src = load_model(model)
    first_in = next(
        i.name
        for i in src.model.graph.input
        if i.name not in {t.name for t in src.model.graph.initializer}
    )
    preset, how = resolve_preset(opts, first_in, src.model.graph.output[0].name)
    say(f"preset: {preset.name} ({how})")
    input_name, output_name = find_io(src.model, preset, str(src.path))
    classes = num_classes(src.model, output_name)
    labels = load_labels(opts.labels or preset.labels)
    if classes is not None and len(labels) != classes:
        raise ModelError(
            f"{src.path}: the model has {classes} classes but the label set has {len(labels)}; "
            "pass --labels FILE"
        )

    engine = get_engine(opts.engine)
    if not engine.supports(opts.precision):
        raise QuenchError(f"engine {engine.name} cannot build precision {opts.precision}")
    batched = set_batch(src.model, opts.batch)
    spec = CompileSpec(opts.precision, input_name, output_name, opts.batch, opts.threads)
    say(f"compiling with {engine.name} {engine.version()} ({opts.precision})")
    compiled = engine.compile(batched, spec)

    verification = _verify(batched, compiled, engine, spec, preset)
    say(
        f"verified against the source model: max |diff| {verification['max_abs_diff']:.2e}, "
        f"top-1 agreement {verification['top1_agreement']:.0%}"
    )

    manifest: dict[str, Any] = {
        "name": opts.name or preset.name if how != "generic" else opts.name or src.path.stem,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quench_version": __version__,
        "source": src.describe(),
        "preset": {"name": preset.name, "chosen": how},
        "precision": {"mode": opts.precision, **compiled.info},
        "engine": {"name": engine.name, "version": engine.version(), "options": compiled.options},
        "io": {
            "input": {
                "name": input_name,
                "dtype": "float32",
                "shape": [opts.batch or "N", *preset.data.input_shape],
            },
            "output": {
                "name": output_name,
                "dtype": "float32",
                "shape": [opts.batch or "N", len(labels)],
            },
        },
        "batch": {"policy": "fixed" if opts.batch else "dynamic", "size": opts.batch},
        "preprocess": preset.data.to_dict(),
        "output_kind": preset.output_kind,
        "labels": labels,
        "build": {k: v for k, v in asdict(opts).items() if v not in (None, {}, ())},
        "host": cpu_info(),
        "verification": verification,
    }
    art = artifact.Artifact(manifest, compiled.payloads)
    manifest["build_seconds"] = round(time.perf_counter() - started, 3)
    artifact.save(art, output)
    say(f"wrote {output} ({Path(output).stat().st_size / 1e6:.1f} MB)")
    return Model(art, path=Path(output), threads=opts.threads)


def _verify(
    model: Any, compiled: Any, engine: Any, spec: CompileSpec, preset: Preset
) -> dict[str, Any]:
    """Run the compiled model and the source model on the same random batch and compare."""
    from quench.backend.onnxruntime.runner import OnnxRuntimeRunner

    n = spec.batch or 2
    x = np.random.default_rng(0).standard_normal((n, *preset.data.input_shape)).astype(np.float32)
    feed = {spec.input_name: x}
    with OnnxRuntimeRunner(model.SerializeToString(), graph_optimization_level="disable") as ref:
        expected = ref.infer(feed)[spec.output_name]
    with engine.runner(compiled.payloads, compiled.options, threads=spec.threads) as run:
        got = run.infer(feed)[spec.output_name]
    if got.shape != expected.shape:
        raise ModelError(f"compiled model output shape {got.shape} != source {expected.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
    scale = float(np.max(np.abs(expected))) or 1.0
    agree = float(np.mean(got.argmax(1) == expected.argmax(1)))
    if spec.precision == "force_float32" and diff > 1e-3 * max(1.0, scale):
        raise ModelError(f"compiled fp32 model differs from the source by {diff:.3g}")
    return {"batch": n, "max_abs_diff": diff, "max_abs_reference": scale, "top1_agreement": agree}
