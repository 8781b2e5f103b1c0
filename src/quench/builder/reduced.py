"""Reduced precision (bf16, fp16 compute) with the guarantees of INT8.

A bf16 or fp16 build passes the same fidelity gate as INT8 (top-1 agreement with fp32 on
held-out images, in the manifest and the self-check) and the same accuracy check; when it
misses a bound, it repairs itself like INT8 (:mod:`quench.builder.repair`) by keeping its most
sensitive *reduced-precision layers* (Conv, Gemm, MatMul: what OpenVINO computes in bf16/f16)
in fp32, marked per node in the IR (:mod:`quench.backend.openvino.keep_f32`).

- *Layers*: the source model's Conv/ConvTranspose/Gemm/MatMul nodes.
- *Sensitivity*: for each layer, how much closer the logits come to fp32 with only that layer
  in fp32 (mean KL of the softmax outputs, as for INT8: :func:`sensitivity.effect`), measured
  with the chosen engine's own kernels on calibration images (each what-if recompiles the
  chosen candidate's IR with one layer marked: no reconversion).
- *Bound*: with images (``--calib-images`` for the gate, ``--check-images`` for the accuracy
  check), a reduced-precision build's default ``--min-top1-agreement`` is
  :data:`HALF_MIN_TOP1_AGREEMENT`; on random input (no images) it is INT8's smoke-test bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnx

from quench.backend.base import Compiled
from quench.builder import repair, sensitivity
from quench.builder.engines import Candidate, Prepared
from quench.errors import QuenchError
from quench.imaging import Normalizer
from quench.precision import Precision
from quench.progress import Bar
from quench.selfcheck import DEFAULT_MIN_TOP1_AGREEMENT, fidelity

# bf16/fp16 with images: at most 2% of top-1 answers changed (3 of 160 held-out images; the
# 1% once chosen repaired efficientnet-lite0 to 0.62x of all-bf16's speed for 2 images of 800)
HALF_MIN_TOP1_AGREEMENT = 0.98
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
BATCH = 8
SENSITIVITY_IMAGES = 32  # probe images ranked on when no image is held out (random input)
Log = Callable[[str], None]


def min_top1_agreement(precision: str, given: float | None, images: bool) -> float:
    """The fidelity bound: as given, else the default for this precision (reduced precision
    with images: :data:`HALF_MIN_TOP1_AGREEMENT`)."""
    if given is not None:
        return given
    if Precision.parse(precision).family == "half" and images:
        return HALF_MIN_TOP1_AGREEMENT
    return DEFAULT_MIN_TOP1_AGREEMENT


def layer_names(model: onnx.ModelProto) -> list[str]:
    """The reduced-precision layers of ``model`` (named nodes), in graph order."""
    return [n.name for n in model.graph.node if n.op_type in LAYER_OPS and n.name]


def computes_half(candidate: Candidate) -> bool:
    """Whether the candidate really computes in bf16/f16 (not fp32 substituted for fp16)."""
    return candidate.compiled.info.get("inference_precision") in ("bfloat16", "float16")


def repairable(precision: Precision, candidate: Candidate, repair_on: bool) -> bool:
    return (
        repair_on
        and precision.family == "half"
        and candidate.engine.name == "openvino"
        and computes_half(candidate)
    )


def locatable(candidate: Candidate, names: Sequence[str]) -> list[str]:
    """``names`` that the candidate's IR has a layer for (graph order kept)."""
    from quench.backend.openvino import keep_f32
    from quench.backend.openvino.runner import XML

    layers = keep_f32.outputs_of(candidate.prepared.model, names)
    found = keep_f32.locatable(candidate.compiled.payloads[XML], layers)
    return [n for n in names if n in found]


def with_float32(candidate: Candidate, names: Sequence[str]) -> Compiled:
    """The candidate's compiled IR with ``names`` kept in fp32 (no reconversion)."""
    from quench.backend.openvino import keep_f32
    from quench.backend.openvino.runner import XML

    c = candidate.compiled
    layers = keep_f32.outputs_of(candidate.prepared.model, names)
    payloads = {**c.payloads, XML: keep_f32.mark(c.payloads[XML], layers)}
    return Compiled(payloads, dict(c.options), dict(c.info))


def logits(candidate: Candidate, compiled: Compiled, x: np.ndarray, spec: Any) -> np.ndarray:
    """``compiled``'s outputs on ``x`` (in the artifact's input form), in batches."""
    engine = candidate.engine
    with engine.runner(compiled.payloads, compiled.options, threads=spec.threads) as run:
        out = [
            run.infer({spec.input_name: np.ascontiguousarray(x[i : i + BATCH])})[spec.output_name]
            for i in range(0, len(x), BATCH)
        ]
    return np.concatenate(out)


def rank(
    candidate: Candidate,
    spec: Any,
    x: np.ndarray,
    ref: np.ndarray,
    names: Sequence[str],
    progress: bool,
) -> tuple[sensitivity.Effect, dict[str, sensitivity.Effect], list[str]]:
    """The all-reduced model's effect on ``x``, each layer's effect alone in fp32, and the
    layers most sensitive first; ``ref``: fp32's logits of ``x``."""
    base = sensitivity.effect(logits(candidate, candidate.compiled, x, spec), ref)
    each: dict[str, sensitivity.Effect] = {}
    with Bar("ranking layers by sensitivity", len(names), enabled=progress) as bar:
        for name in names:
            out = logits(candidate, with_float32(candidate, [name]), x, spec)
            each[name] = sensitivity.effect(out, ref)
            bar.advance()
    return base, each, sensitivity.rank(base, each)


def judge(
    candidate: Candidate,
    spec: Any,
    probe: Any,
    bound: float,
    check: repair.CheckSet | None,
    max_drop: float | None,
) -> repair.Judge:
    """A repair step for reduced precision: the mix compiled (IR marked), its top-1 agreement
    with fp32 on the probe and, with check images, its top-1 drop there."""

    def verdict(names: Sequence[str]) -> repair.Verdict:
        compiled = with_float32(candidate, names)
        agree = fidelity(logits(candidate, compiled, probe.x, spec), probe.reference)[
            "top1_agreement"
        ]
        figures: dict[str, Any] = {"top1_agreement": round(agree, 4)}
        passed, score = agree >= bound, agree - bound
        if check is not None:
            drop = round(check.drop(logits(candidate, compiled, check.x, spec)), 4)
            figures["top1_drop_points"] = drop
            if max_drop is not None:
                passed = passed and drop <= max_drop
                score = min(score, (max_drop - drop) / 100)
        return repair.Verdict(figures, passed, score)

    return verdict


def ranking_set(plan: Any, calib: Any, probe: Any) -> tuple[np.ndarray, np.ndarray, str]:
    """The images the layers are ranked on, with fp32's logits: the calibration images held
    out of the gate's (a float build judges on the rest), else the first of the probe's."""
    held = (
        None if calib is None else (calib.held_out_pixels if plan.data.pixels else calib.held_out)
    )
    if held is None or not len(held):
        n = SENSITIVITY_IMAGES
        return probe.x[:n], probe.reference[:n], f"the first {n} of the gate's {probe.source}"
    fx = Normalizer(plan.preset.data).batch(held) if plan.data.pixels else held
    spec = plan.spec
    ref = sensitivity.run(plan.dynamic, spec.input_name, fx)[spec.output_name]
    return np.asarray(held), ref, f"{len(held)} {calib.kind} the gate does not judge on"


def repaired(
    candidate: Candidate,
    spec: Any,
    probe: Any,
    x: np.ndarray,
    ref: np.ndarray,
    where: str,
    opts: Any,
    failure: QuenchError,
    check: repair.CheckSet | None,
    say: Log,
) -> Prepared:
    """Rank the layers on ``x`` (fp32 logits ``ref``; ``where``: what they are), search the
    fewest kept in fp32 that pass the bounds, and return the prepared model to compile with
    them; the failure (with the best mix found) when none does."""
    names = locatable(candidate, [n for n in layer_names(candidate.prepared.model)])
    names = [n for n in names if n not in opts.float_layers]
    say(f"{failure}; ranking {len(names)} reduced-precision layers by sensitivity on {where}")
    t = time.perf_counter()
    base, each, ranking = rank(candidate, spec, x, ref, names, opts.progress)
    rank_seconds = time.perf_counter() - t
    j = judge(candidate, spec, probe, opts.min_top1_agreement, check, opts.max_top1_drop)
    t = time.perf_counter()
    with Bar("searching fp32 layers", None, enabled=opts.progress):
        plan = repair.search(ranking, j, say)
    record = {
        "failure": str(failure),
        "sensitivity_images": len(x),
        "sensitivity_on": where,
        "all_reduced": base.to_dict(),
        "ranking": [{"name": n, **each[n].to_dict()} for n in ranking],
        "steps": [s.to_dict() for s in plan.steps],
        "seconds": {"rank": round(rank_seconds, 2), "search": round(time.perf_counter() - t, 2)},
    }
    if plan.float_layers is None:
        best = plan.best
        figures = "; ".join(f"{a} {b}" for a, b in best.verdict.figures.items()) if best else ""
        raise type(failure)(
            f"{failure}; no mix of fp32 layers meets the bound: the best found keeps "
            f"{best.float_layers if best else 0} of {len(ranking)} layers in fp32 ({figures})"
        )
    chosen = [*opts.float_layers, *plan.float_layers]
    say(f"keeping {len(plan.float_layers)} layer(s) in fp32: {', '.join(plan.float_layers)}")
    section = {"float32_layers": chosen, "repair": {**record, "float32_layers": plan.float_layers}}
    return replace(candidate.prepared, float32_layers=tuple(chosen), reduced=section)


def float_prepared(
    model: onnx.ModelProto, precision: Precision, float_layers: Sequence[str]
) -> list[Prepared]:
    """A float build's one prepared model; on reduced precision ``--float-layers`` (ONNX node
    names, checked) stay in fp32 from the start."""
    if precision.family != "half" or not float_layers:
        return [Prepared(model)]
    known = set(layer_names(model))
    if unknown := [n for n in float_layers if n not in known]:
        raise QuenchError(
            f"--float-layers: {', '.join(unknown[:5])} not a Conv/Gemm/MatMul node of the model"
        )
    section = {"float32_layers": list(float_layers), "requested": list(float_layers)}
    return [Prepared(model, float32_layers=tuple(float_layers), reduced=section)]
