"""``quench diagnose`` for bf16 / fp16-compute builds: each reduced-precision layer's
sensitivity (how much closer the logits come to fp32 with only that layer in fp32, measured
with the engine's own kernels: :mod:`quench.builder.reduced`), whether the artifact keeps it in
fp32, and its share of inference time."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

from quench.builder import reduced, repair, sensitivity
from quench.builder.core import SENSITIVITY_IMAGES, Plan, _calibration_images
from quench.builder.diagnosis import Diagnosis, as_model, assemble, row, time_shares
from quench.builder.engines import Prepared, Reference, compile_candidates
from quench.errors import QuenchError
from quench.evaluate import list_images, read_ground_truth
from quench.imaging import Normalizer
from quench.model import Model
from quench.profile import profile_model

PROFILE_RUNS = 10
_Layer = namedtuple("_Layer", "name output op")


def diagnose(plan: Plan, built: Any, manifest: dict[str, Any] | None, say: Any) -> Diagnosis:
    """The :class:`Diagnosis` of a reduced-precision build."""
    opts, spec = plan.opts, plan.spec
    calib = _calibration_images(opts, plan.preset, say)
    reference = Reference.of(plan.fixed, spec, plan.preset.data.input_shape)
    candidate = compile_candidates(
        [Prepared(plan.fixed)], plan.engines[:1], spec, reference, False, say, plan.src.path
    )[0]
    if not reduced.repairable(plan.precision, candidate, True):
        raise QuenchError(
            f"{opts.precision} computes "
            f"{candidate.compiled.info.get('computes', 'float32')} with "
            f"{candidate.engine.name} here: no reduced-precision layers to diagnose"
        )
    pixels = plan.data.pixels
    x = (calib.pixels if pixels else calib.tensor)[:SENSITIVITY_IMAGES]
    fx = Normalizer(plan.preset.data).batch(x) if pixels else x
    ref = sensitivity.run(plan.dynamic, spec.input_name, fx)[spec.output_name]
    nodes = {n.name: n for n in plan.fixed.graph.node}
    names = reduced.locatable(candidate, reduced.layer_names(plan.fixed))
    say(f"ranking {len(names)} reduced-precision layers by sensitivity")
    base, each, ranking = reduced.rank(candidate, spec, x, ref, names, opts.progress)
    kept = set(((manifest or {}).get("reduced_precision") or {}).get("float32_layers") or [])
    half = "bf16" if plan.precision.float_type == "bfloat16" else "fp16"
    engine_model = Model.load(built) if built is not None else as_model(plan, candidate)
    with engine_model:
        say(f"profiling {engine_model.engine} ({PROFILE_RUNS} runs)")
        batch = engine_model.fixed_batch or 8
        profile = profile_model(engine_model, batch, PROFILE_RUNS, x)
        check = _check(plan, candidate, engine_model) if opts.check_images else None
    all_layers = [_Layer(n, nodes[n].output[0], nodes[n].op_type) for n in names]
    shares = time_shares(profile["layers"], all_layers)
    rows = [
        row(
            layer,
            "fp32" if layer.name in kept else half,
            None,
            base,
            each[layer.name],
            ranking,
            shares,
        )
        for layer in all_layers
    ]
    calibration = {**calib.describe(), "sensitivity_images": len(x)}
    return assemble(
        plan,
        built,
        engine_model.engine,
        calibration,
        base,
        rows,
        ranking,
        check,
        profile,
        shares,
        reduced_to=half,
    )


def _check(plan: Plan, candidate: Any, engine_model: Model) -> dict[str, Any]:
    """Top-1 drop against fp32 on the check images: all layers reduced, and the artifact."""
    opts, spec = plan.opts, plan.spec
    assert opts.check_images is not None
    truth = read_ground_truth(opts.check_labels) if opts.check_labels else None
    given, labels, _ = repair.read_check_images(
        list_images(opts.check_images), engine_model.data, truth, opts.progress
    )
    fx = Normalizer(plan.preset.data).batch(given) if engine_model.data.pixels else given
    ref = sensitivity.run(plan.dynamic, spec.input_name, fx)[spec.output_name]
    check = repair.CheckSet(fx, ref.argmax(1), labels)
    every = reduced.logits(candidate, candidate.compiled, given, spec)
    return {
        "images": len(given),
        "measure": "labels" if labels is not None else "agreement with fp32 top-1",
        "all_int8_top1_drop_points": round(check.drop(every), 4),
        "engine_top1_drop_points": round(check.drop(engine_model.predict(given)), 4),
    }
