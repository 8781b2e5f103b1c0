"""Compile: every candidate engine compiles every prepared model, each result checked against
the source model.

The interface is small on purpose: :func:`compile_candidates` turns prepared models into
:class:`Candidate` s; :func:`quench.builder.select.choose` turns candidates into a
:class:`Selection` (ranked, best first, with one record per candidate for the manifest).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quench.backend import ENGINES, Compiled, CompileSpec, Engine, get_engine
from quench.backend.onnxruntime.runner import OnnxRuntimeRunner
from quench.errors import ModelError, QuenchError
from quench.imaging import Normalizer
from quench.perf import random_batch
from quench.precision import FORCE_FLOAT32

# Engine preference for --engine auto: the first installed engine that runs the precision.
# torch-cuda runs only where torch sees a CUDA GPU (its supports() is false elsewhere).
ENGINE_ORDER = ("onnxruntime", "openvino", "torch-cuda")

Log = Callable[[str], None]


@dataclass
class Prepared:
    """A model ready to compile: the source graph, or one quantized form of it, at the build's
    batch size, with the payloads and manifest section that come with it."""

    model: onnx.ModelProto
    payloads: dict[str, bytes] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None  # the manifest's quantization section
    first_layer: str | None = None  # "float" or "pixel grid" when both forms are candidates
    # INT8: the float graph the QDQ model was made from (dynamic batch), where layers kept in
    # float take their weights (quench.builder.quantize.layers.with_float_layers)
    float_model: onnx.ModelProto | None = None
    # bf16 / f16 compute: layers kept in fp32 (quench.builder.reduced, the repair's choice)
    float32_layers: tuple[str, ...] = ()
    reduced: dict[str, Any] | None = None  # the manifest's reduced_precision section


@dataclass
class Candidate:
    """One engine's compiled form of one prepared model, with one runtime option set, checked
    against the source model."""

    engine: Engine
    compiled: Compiled  # its options include ``variant``
    variant: dict[str, Any]  # the runtime options this candidate adds to the engine's own
    verification: dict[str, Any]  # the check against the source model on a random batch
    prepared: Prepared

    def record(self) -> dict[str, Any]:
        """What the manifest lists for this candidate when nothing was timed."""
        tag = self.prepared.first_layer
        return {"engine": self.engine.name, **({"first_layer": tag} if tag else {})}

    def describe(self) -> str:
        tag = self.prepared.first_layer
        return f"{self.engine.name} {self.compiled.options}" + (
            f", first layer {tag}" if tag else ""
        )


@dataclass
class Selection:
    """The candidates, best first (the build tries them in this order until one passes its
    checks), and one record per candidate in the same order (the manifest's
    ``engine_selection.candidates``)."""

    ranked: list[Candidate]
    records: list[dict[str, Any]]
    # how the ranking was decided (quench.builder.select): rounds, decision, margin, rule
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def unranked(cls, candidates: list[Candidate]) -> Selection:
        """Nothing to choose between: the candidates as they are, untimed."""
        return cls(list(candidates), [c.record() for c in candidates])


@dataclass
class Reference:
    """The source model's output on one random batch: what every candidate must reproduce."""

    feed: dict[str, np.ndarray]  # what the compiled candidates take (uint8 pixels, --input uint8)
    expected: np.ndarray

    @classmethod
    def of(
        cls, model: onnx.ModelProto, spec: CompileSpec, input_shape: tuple[int, ...]
    ) -> Reference:
        """Run ``model`` (at the build's batch) unoptimised on ONNX Runtime, once per build;
        ``input_shape``: the source model's. With ``spec.preprocess``, the batch is random
        pixels, normalised for the source model as the image pipeline would."""
        n = spec.batch or 2
        if spec.preprocess is not None:
            crop = spec.preprocess.crop
            pixels = random_batch((crop, crop, 3), n, "uint8")
            x = Normalizer(spec.preprocess.as_float()).batch(pixels)
            feed = {spec.input_name: pixels}
        else:
            x = random_batch(input_shape, n)
            feed = {spec.input_name: x}
        with OnnxRuntimeRunner(
            model.SerializeToString(), graph_optimization_level="disable"
        ) as ref:
            return cls(feed, ref.infer({spec.input_name: x})[spec.output_name])

    def check(self, compiled: Compiled, engine: Engine, spec: CompileSpec) -> dict[str, Any]:
        """Run ``compiled`` on the same batch and compare; :class:`ModelError` when it is wrong."""
        with engine.runner(compiled.payloads, compiled.options, threads=spec.threads) as run:
            got = run.infer(self.feed)[spec.output_name]
        expected = self.expected
        if got.shape != expected.shape:
            raise ModelError(f"compiled model output shape {got.shape} != source {expected.shape}")
        diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
        scale = float(np.max(np.abs(expected))) or 1.0
        agree = float(np.mean(got.argmax(1) == expected.argmax(1)))
        if spec.precision == FORCE_FLOAT32.name and diff > 1e-3 * max(1.0, scale):
            raise ModelError(f"compiled fp32 model differs from the source by {diff:.3g}")
        if not np.all(np.isfinite(got)):
            raise ModelError("the compiled model produces non-finite outputs")
        n = len(next(iter(self.feed.values())))
        return {
            "batch": n,
            "max_abs_diff": diff,
            "max_abs_reference": scale,
            "top1_agreement": agree,
        }


def candidate_engines(name: str, precision: str) -> list[Engine]:
    """The named engine, or for ``auto`` every installed engine that runs ``precision``."""
    if name != "auto":
        engine = get_engine(name)
        why = engine.refusal(precision)
        if why is not None:
            raise QuenchError(why)
        return [engine]
    found, problems = [], []
    for candidate in ENGINE_ORDER:
        if candidate not in ENGINES:
            continue
        try:
            engine = get_engine(candidate)
        except QuenchError as exc:
            problems.append(str(exc))
            continue
        if engine.supports(precision):
            found.append(engine)
    if not found:
        why = "; ".join(problems) or "none supports it"
        raise QuenchError(f"no installed engine runs {precision} here ({why})")
    return found


def compile_candidates(
    prepared: list[Prepared],
    engines: list[Engine],
    spec: CompileSpec,
    reference: Reference,
    variants: bool,
    say: Log,
    source: Path,
) -> list[Candidate]:
    """Compile every prepared model with every engine and check each against ``reference``;
    with ``variants``, each engine's runtime option sets are candidates of their own. A
    rejected compile is logged and skipped, unless it was the only possibility."""
    candidates = []
    for p in prepared:
        for engine in engines:
            say(
                f"compiling with {engine.name} {engine.version()} ({spec.precision}"
                + (f", first layer {p.first_layer})" if p.first_layer else ")")
            )
            try:
                pspec = replace(spec, float32_layers=p.float32_layers) if p.float32_layers else spec
                compiled = engine.compile(p.model, pspec)
                verification = reference.check(compiled, engine, spec)
                if note := compiled.info.get("note"):
                    say(f"  {note}")
            except QuenchError as exc:
                if len(engines) == 1 and len(prepared) == 1:
                    raise
                say(f"  {engine.name} rejected: {exc}")
                continue
            for variant in engine.variants(spec) if variants else [{}]:
                options = {**compiled.options, **variant}
                with_variant = Compiled(compiled.payloads, options, compiled.info)
                candidates.append(Candidate(engine, with_variant, variant, verification, p))
    if not candidates:
        raise QuenchError(f"no engine could build {spec.precision} for {source}")
    return candidates
