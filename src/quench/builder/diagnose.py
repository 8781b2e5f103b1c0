"""``quench diagnose``: which layers cost accuracy, and what each costs in time.

For every quantizable layer of an INT8 build (from an ONNX model, or re-made from an INT8
artifact's source model and recorded settings, byte for byte as its build made it): its
precision, the SQNR of its output in the all-INT8 model against fp32, its sensitivity (how much
closer the logits come to fp32 with only that layer in float, on calibration images; see
:mod:`quench.builder.sensitivity`) and its share of inference time from the engine's own
profiler (:mod:`quench.profile`).
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from quench import artifact
from quench.builder import diagnose_reduced, repair, sensitivity
from quench.builder.core import (
    SENSITIVITY_IMAGES,
    BuildOptions,
    Log,
    _calibration_images,
    _plan,
    _prepare,
    _rank_layers,
)
from quench.builder.diagnosis import (  # noqa: F401  (table, plot, html: the CLI's)
    COLUMNS,
    Diagnosis,
    as_model,
    assemble,
    html,
    plot,
    row,
    table,
    time_shares,
)
from quench.builder.engines import Reference, compile_candidates
from quench.builder.quantize.layers import layers
from quench.errors import QuenchError
from quench.evaluate import list_images, read_ground_truth
from quench.imaging import Normalizer
from quench.model import Model
from quench.precision import Precision
from quench.profile import profile_model
from quench.zoo.fetch import sha256_file

PROFILE_RUNS = 10


def options_of(path: Path, source: Path | None) -> tuple[Path, BuildOptions, dict[str, Any]]:
    """An INT8 artifact's source model (``source``, else the file its build read, beside the
    artifact or in the working directory; checked against the recorded sha256), its build
    options as recorded, and its manifest."""
    art = artifact.load(path)
    m = art.manifest
    settings = dict(m.get("build") or {})
    half = Precision.parse(str((m.get("precision") or {}).get("mode"))).family == "half"
    if not m.get("quantization") and not half:
        raise QuenchError(f"{path}: not an INT8, bf16 or fp16 artifact: nothing to diagnose")
    name = (m.get("source") or {}).get("file") or ""
    found = [p for p in ([source] if source else [path.parent / name, Path(name)]) if p.is_file()]
    if not found or (not name and not source):
        raise QuenchError(
            f"{path}: its source model {name or '(unknown)'} is not beside it or here; "
            "pass --source MODEL"
        )
    src = found[0]
    want = (m.get("source") or {}).get("sha256")
    if want and sha256_file(src) != want:
        raise QuenchError(f"{src}: not the model {path} was built from (sha256 differs)")
    known = {f.name for f in fields(BuildOptions)}
    opts = BuildOptions(**{k: _tuple(v) for k, v in settings.items() if k in known})
    return src, opts, m


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def diagnose(
    model: str | Path,
    opts: BuildOptions,
    built: str | Path | None = None,
    manifest: dict[str, Any] | None = None,
    say: Log | None = None,
) -> Diagnosis:
    """Diagnose the INT8 build of ``model`` with ``opts`` (``built``: the artifact made from
    them, whose layer precisions and engine the report then shows)."""
    say = say or (lambda msg: None)
    if not opts.calib_images:
        raise QuenchError("diagnose needs --calib-images (a folder or list)")
    opts = replace(opts, float_layers=())  # the all-INT8 model: what sensitivity starts from
    plan = _plan(model, opts, say)
    if plan.precision.family == "half":
        return diagnose_reduced.diagnose(plan, built, manifest, say)
    if not plan.precision.is_int8:
        raise QuenchError(f"diagnose needs an INT8, bf16 or fp16 precision, not {opts.precision}")
    calib = _calibration_images(opts, plan.preset, say)
    prepared = _prepare(plan, calib, say)[0]
    assert prepared.float_model is not None
    spec = plan.spec
    qdq, float_model = plan.at_reference_batch(prepared.model), prepared.float_model
    all_layers = layers(qdq)
    names = [x.name for x in all_layers if x.precision == "int8"]
    x = calib.tensor[:SENSITIVITY_IMAGES]
    probe = calib.held_out if calib.held_out is not None and len(calib.held_out) else x
    say(f"output SQNR of {len(all_layers)} layers on {len(probe)} held-out calibration images")
    sqnr = sensitivity.layer_sqnr(qdq, float_model, spec.input_name, probe)
    base, each, ranking = _rank_layers(plan, qdq, float_model, x, names)
    in_artifact = ((manifest or {}).get("quantization") or {}).get("layers") or {}

    if built is not None:
        engine_model = Model.load(built)
    else:
        reference = Reference.of(plan.fixed, spec, plan.preset.data.input_shape)
        candidate = compile_candidates(
            [prepared], plan.engines[:1], spec, reference, False, say, plan.src.path
        )[0]
        engine_model = as_model(plan, candidate)
    with engine_model:
        say(f"profiling {engine_model.engine} ({PROFILE_RUNS} runs)")
        batch = engine_model.fixed_batch or 8
        inputs = calib.pixels if engine_model.data.pixels else calib.tensor  # --input uint8
        profile = profile_model(engine_model, batch, PROFILE_RUNS, inputs)
        check = _check(plan, qdq, engine_model, opts) if opts.check_images else None
    shares = time_shares(profile["layers"], all_layers)
    rows = [
        row(
            layer,
            in_artifact.get(layer.name, layer.precision),
            sqnr.get(layer.name),
            base,
            each.get(layer.name),
            ranking,
            shares,
        )
        for layer in all_layers
    ]
    calibration = {**calib.describe(), "sensitivity_images": len(x)}
    return assemble(
        plan, built, engine_model.engine, calibration, base, rows, ranking, check, profile, shares
    )


def _check(plan: Any, qdq: Any, engine_model: Model, opts: BuildOptions) -> dict[str, Any]:
    """Top-1 drop against fp32 on the check images: the all-INT8 model (simulated) and the
    engine's model (the artifact's mix, or all INT8)."""
    assert opts.check_images is not None
    truth = read_ground_truth(opts.check_labels) if opts.check_labels else None
    given, labels, _ = repair.read_check_images(  # as the engine's model takes them
        list_images(opts.check_images), engine_model.data, truth, opts.progress
    )
    x = Normalizer(plan.preset.data).batch(given) if engine_model.data.pixels else given
    spec = plan.spec
    ref = sensitivity.run(plan.dynamic, spec.input_name, x)[spec.output_name]
    check = repair.CheckSet(x, ref.argmax(1), labels)
    all_int8 = sensitivity.run(qdq, spec.input_name, x)[spec.output_name]
    return {
        "images": len(x),
        "measure": "labels" if labels is not None else "agreement with fp32 top-1",
        "all_int8_top1_drop_points": round(check.drop(all_int8), 4),
        "engine_top1_drop_points": round(check.drop(engine_model.predict(given)), 4),
    }
