"""``build()``: plan (options, source model, preset) -> prepare (calibrate + quantize) ->
compile and select (:mod:`quench.builder.engines`) -> accept (fidelity gate, self-check,
accuracy check) -> write."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from quench import __version__, artifact, batch_form, signing
from quench.backend import CompileSpec, Engine
from quench.backend.onnxruntime.loader import OnnxRuntimeEngine, optimize
from quench.backend.onnxruntime.runner import OnnxRuntimeRunner
from quench.builder import reduced, repair, sensitivity
from quench.builder.calibration import CalibrationSet, load_calibration
from quench.builder.engines import (
    Candidate,
    Prepared,
    Reference,
    Selection,
    candidate_engines,
    compile_candidates,
)
from quench.builder.gates import fidelity_gate as _fidelity_gate
from quench.builder.gates import not_written as _not_written
from quench.builder.quantize import QuantConfig, QuantResult, Source, quantize
from quench.builder.quantize import cache as ranges_cache
from quench.builder.quantize.layers import check_names, layers, with_float_layers
from quench.builder.quantize.qdq import quantized_counts
from quench.builder.select import choose
from quench.canonical import Rewrite, canonical, output_kind
from quench.destination import check_file
from quench.errors import EngineError, ModelError, QuenchError
from quench.evaluate import GroundTruth, list_images, read_ground_truth, score
from quench.graph import (
    SourceModel,
    count_macs,
    find_io,
    load_model,
    num_classes,
    real_inputs,
    set_batch,
    shape_of,
    upgrade_opset,
)
from quench.hw import cpu_info, int8_accumulates_in_int32, one_blas_thread
from quench.imaging import Normalizer
from quench.labels import load_labels
from quench.manifest import IO, Batch, EngineInfo, Manifest, PrecisionInfo, Tensor
from quench.model import Model
from quench.perf import random_batch
from quench.pipeline import Prediction
from quench.precision import FORCE_FLOAT32, NAMES, Precision
from quench.presets import (
    INPUTS,
    DataConfig,
    Preset,
    detect_preset,
    fit_to_input,
    get_preset,
)
from quench.progress import Bar
from quench.selfcheck import IMAGES as SELFCHECK_IMAGES
from quench.selfcheck import FidelityError, fidelity
from quench.selfcheck import record as record_selfcheck
from quench.zoo.fetch import cache_dir

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PRECISIONS = NAMES  # the --precision names, from quench.precision
TARGETS = ("portable", "native")
# Where 7-bit weights are exact: u8 x s7 pair sums fit int16 (2 x 255 x 64 <= 32767)
PORTABLE_CLASSES = "every CPU: x86-64 (SSE4.1, AVX2, AVX-512 with or without VNNI, AMX) and ARM"
CALIBRATION_PAYLOAD = "calibration.json"
SENSITIVITY_IMAGES = 32  # calibration images the repair ranks layers on

Log = Callable[[str], None]


class AccuracyGateError(QuenchError):
    """The built model lost more top-1 accuracy than ``--max-top1-drop`` allows."""


@dataclass
class BuildOptions:
    """Everything ``quench build`` takes besides the model and output paths."""

    precision: str = FORCE_FLOAT32.name
    preset: str | None = None
    name: str | None = None
    labels: str | None = None  # label file or built-in label set
    batch: int | None = None  # fixed batch size
    # True: mutable batch (rewriting a Reshape that hard-codes the batch, where that is checked
    # to be exact); None: mutable where the model declares a symbolic batch and runs any,
    # else fixed at the batch it declares or runs (quench.batch_form.policy)
    dynamic_batch: bool | str | None = None  # or batch_form.IF_POSSIBLE
    engine: str = "auto"
    threads: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: int | None = None
    crop: int | None = None
    interpolation: str | None = None
    channel_order: str | None = None
    layout: str | None = None
    # the engine's input: float32 (normalised tensors) or uint8 (pixels: the channel order,
    # mean/std and layout change folded into the engine graph)
    input: str = "float32"
    # INT8 calibration
    calib_images: str | None = None  # folder or list file
    calib_count: int = 200
    calib_method: str | None = None  # None: the measured default
    calib_cache: str | None = None  # a reusable calibration cache file
    bias_correction: bool | None = None  # None: the measured default
    float_first_layer: bool | None = None  # None: the pixel grid where it fits, else float
    # portable: 7-bit weights, exact on every CPU; native: 8-bit where this host's int8
    # accumulates in int32 (VNNI, AMX, ARM), exact only on such CPUs
    target: str = "portable"
    fp16_compute: bool = False  # force_float16: float16 compute even where slower than fp32
    # mixed precision: layers (ONNX node names) kept in float / kept in INT8 whatever the repair
    float_layers: tuple[str, ...] = ()
    int8_layers: tuple[str, ...] = ()
    # a build that misses its bound keeps its most sensitive layers in float until it holds
    repair: bool = True
    # accuracy check at build time
    check_images: str | None = None
    check_labels: str | None = None
    max_top1_drop: float | None = None  # percentage points
    # the fidelity gate: top-1 agreement with fp32 on held-out calibration images
    # None: the precision's default (builder.reduced.min_top1_agreement)
    min_top1_agreement: float = None  # type: ignore[assignment] - set in __post_init__
    # --engine auto: seconds per candidate, batch size and round; rounds go on until the
    # ranking is clear or the budget ends (quench.builder.select)
    select_seconds: float = 0.25
    select_budget: float = 30.0
    progress: bool = True

    def __post_init__(self) -> None:
        with suppress(QuenchError):  # an unknown precision is refused by the build itself
            images = bool(self.calib_images or self.check_images)
            bound = reduced.min_top1_agreement(self.precision, self.min_top1_agreement, images)
            self.min_top1_agreement = bound


@dataclass
class Plan:
    """What a build works from once its options are checked: the source model (one copy per
    batch setting), its preset, tensors and labels, and the candidate engines."""

    opts: BuildOptions
    precision: Precision
    src: SourceModel
    preset: Preset
    preset_how: str  # named, detected or generic
    labels: list[str]
    engines: list[Engine]
    spec: CompileSpec
    fixed: onnx.ModelProto  # the source at the build's batch size
    # the source at a dynamic batch size (``fixed`` if that is dynamic); for a graph that runs
    # only at one batch, at that batch (ONNX Runtime then runs it in chunks of it)
    dynamic: onnx.ModelProto
    form: batch_form.BatchForm | None = None  # what batch sizes the source graph runs
    rewrites: list[Rewrite] = field(default_factory=list)  # what Quench changed in the graph
    output_kind: str = "logits"  # the class output: logits or probabilities (a softmax)

    def at_reference_batch(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` (a form of the source) at the batch of the build's own runs of it: symbolic,
        or the one batch a graph that is not batch-mutable runs."""
        mutable = self.form is None or self.form.mutable is not None
        return set_batch(model, None if mutable else self.form.only)

    @property
    def data(self) -> DataConfig:
        """The artifact's data config: the preset's (the source model's input), with the
        engine input ``--input`` asks for."""
        return replace(self.preset.data, input=self.opts.input)


@dataclass
class Probe:
    """The fidelity gate's images and the fp32 source model's outputs for them."""

    x: np.ndarray  # as the built model takes them (float32, or uint8 pixels)
    reference: np.ndarray
    source: str  # what the images are, for messages and the manifest
    # the fp32 source model's predictions on the check images, once computed (one per build)
    fp32_check: list[Prediction] | None = None


def build(
    model: str | Path,
    output: str | Path,
    options: BuildOptions | None = None,
    log: Log | None = None,
    sign_key: Ed25519PrivateKey | None = None,
    **kwargs: Any,
) -> Model:
    """Build ``model`` into the artifact ``output`` and return it loaded; ``sign_key``
    (:func:`quench.signing.load_private_key`) signs it."""
    started = time.perf_counter()
    check_file(output)  # before any work: a folder, or a folder that does not exist
    say: Log = log or (lambda msg: None)
    opts = options or BuildOptions(**kwargs)
    with _engine_failures(model, opts):
        return _build(model, output, opts, say, sign_key, started)


@contextmanager
def _engine_failures(model: str | Path, opts: BuildOptions) -> Iterator[None]:
    """An engine's failure anywhere in the build as one line: the model, the node and the
    cause, and what to try."""
    try:
        yield
    except EngineError as exc:
        tries = ["--engine onnxruntime or --engine openvino"] if opts.engine == "auto" else []
        tries += ["--batch 1"] if opts.batch != 1 else []
        hint = f" (try {' or '.join(tries)})" if tries else ""
        raise ModelError(f"{model}: {exc}{hint}") from None


def _build(
    model: str | Path,
    output: str | Path,
    opts: BuildOptions,
    say: Log,
    sign_key: Ed25519PrivateKey | None,
    started: float,
) -> Model:
    """:func:`build`'s steps."""
    plan = _plan(model, opts, say)
    opts = plan.opts
    timings: dict[str, float] = {}
    calib = _calibration_images(opts, plan.preset, say) if opts.calib_images else None
    with _timed(timings, "calibrate_quantize") if plan.precision.is_int8 else nullcontext():
        prepared = _prepare(plan, calib, say)
    with _timed(timings, "compile_and_select"):
        selection = _compile_and_select(plan, prepared, say)
    probe = _probe(plan, calib)
    try:
        manifest, art, built = _accept(plan, selection, probe, Path(output), timings, say)
    except (FidelityError, AccuracyGateError) as exc:
        if not _repairable(plan, selection):
            raise _not_written(exc, opts) from None
        try:
            with _timed(timings, "repair"):
                prepared = [_repair(plan, selection, probe, calib, exc, say)]
            with _timed(timings, "compile_and_select"):
                selection = _compile_and_select(plan, prepared, say)
            # the repaired model, confirmed by the same gates
            manifest, art, built = _accept(plan, selection, probe, Path(output), timings, say)
        except (FidelityError, AccuracyGateError) as again:
            raise _not_written(again, opts) from None
    manifest.timings = timings
    manifest.build_seconds = round(time.perf_counter() - started, 3)
    return _write(manifest, art, built, output, say, sign_key)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[key]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - t, 3)


# -- plan: options, source model, preset ----------------------------------------------------


def _plan(model: str | Path, opts: BuildOptions, say: Log) -> Plan:
    """Check the options, load the model, choose its preset, tensors, labels and engines."""
    precision = Precision.parse(opts.precision)
    if opts.batch is not None and opts.batch < 1:
        raise QuenchError(f"batch size must be >= 1, got {opts.batch}")
    if precision.is_int8 and not opts.calib_images:
        raise QuenchError(f"--precision {opts.precision} needs --calib-images (a folder or list)")
    if opts.target not in TARGETS:
        raise QuenchError(f"unknown target {opts.target!r}; choose one of {', '.join(TARGETS)}")
    if not 0.0 <= opts.min_top1_agreement <= 1.0:
        raise QuenchError(f"--min-top1-agreement must be in [0, 1], got {opts.min_top1_agreement}")
    if opts.check_labels and not opts.check_images:
        raise QuenchError("--check-labels needs --check-images")
    if opts.input not in INPUTS:
        raise QuenchError(f"unknown --input {opts.input!r}; choose one of {', '.join(INPUTS)}")

    src = load_model(model)
    graph, rewrites = canonical(src.model)
    graph_inputs = [i.name for i in real_inputs(graph)]
    preset, how = resolve_preset(opts, graph_inputs[0], graph.graph.output[0].name)
    say(f"preset: {preset.name} ({how})")
    if how != "named" and not (opts.crop or opts.resize or opts.layout):
        data, line = fit_to_input(preset.data, shape_of(real_inputs(graph)[0]))
        if line:
            preset = replace(preset, data=data)
            say(line)
    input_name, output_name = find_io(graph, preset, str(src.path))
    classes = num_classes(graph, output_name)
    labels = load_labels(opts.labels or preset.labels)
    if classes is not None and len(labels) != classes:
        raise ModelError(
            f"{src.path}: the model has {classes} classes but the label set has {len(labels)}; "
            "pass --labels FILE"
        )
    engines = candidate_engines(opts.engine, opts.precision)
    form = batch_form.probe(graph, preset.data.input_shape, str(src.path))
    batch, line = batch_form.policy(form, opts.batch, opts.dynamic_batch, str(src.path))
    say(line)
    spec = CompileSpec(opts.precision, input_name, output_name, batch, opts.threads)
    spec.fp16_compute = opts.fp16_compute
    if opts.input == "uint8":  # every compile of this build folds the preprocessing in
        spec.preprocess = preset.data
    if form.mutable is not None:
        rewrites += form.rewrites
        dynamic = form.mutable
    else:  # every run of it goes in chunks of the one batch it runs
        dynamic = set_batch(graph, form.only)
    fixed = dynamic if batch is None else set_batch(dynamic, batch)
    kind = output_kind(graph, output_name) or preset.output_kind
    plan = Plan(opts, precision, src, preset, how, labels, engines, spec, fixed, dynamic)
    plan.form, plan.rewrites, plan.output_kind = form, rewrites, kind
    for r in rewrites:
        say(f"graph: {r.detail}")
    return plan


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


def artifact_name(preset: Preset, how: str, source: Path) -> str:
    """The preset's name when the model is the preset's (named, or detected with its own data
    config); else the source file's stem: a detected preset whose preprocessing flags replaced
    is another model with the same tensor names (efficientnet-lite1 looks like -lite0)."""
    if how == "named" or (how == "detected" and preset.data == get_preset(preset.name).data):
        return preset.name
    return source.stem


def _calibration_images(opts: BuildOptions, preset: Preset, say: Log) -> CalibrationSet:
    """Read the calibration images through the preset's preprocessing (once per build)."""
    assert opts.calib_images is not None
    calib = load_calibration(
        opts.calib_images, preset.data, opts.calib_count, progress=opts.progress, warn=say
    )
    if opts.check_images:
        overlap = set(calib.files) & {str(p) for p in list_images(opts.check_images)}
        if overlap:
            say(
                f"warning: {len(overlap)} calibration images are also check images: "
                "the accuracy check will look better than it is"
            )
    return calib


# -- prepare: the models to compile (the source, or its quantized forms) --------------------


def _prepare(plan: Plan, calib: CalibrationSet | None, say: Log) -> list[Prepared]:
    """The source model for a float build; for INT8, its quantized form, or both forms of the
    first layer when an accuracy check can decide between them."""
    opts = plan.opts
    if not plan.precision.is_int8:
        return reduced.float_prepared(plan.fixed, plan.precision, opts.float_layers)
    assert calib is not None
    firsts: list[bool | None] = [opts.float_first_layer]
    if (
        opts.engine == "auto"
        and opts.float_first_layer is None
        and opts.check_images
        and not opts.calib_cache
    ):
        # with an accuracy check to decide, also try the faster first layer on the pixel
        # grid: it is kept only when it is faster and passes the check
        firsts = [True, False]
    # what quantization starts from: opset 13, dynamic batch, BN folded (ORT basic)
    optimized = optimize(upgrade_opset(plan.dynamic, 13), level="basic")
    prepared = []
    for first in firsts:
        o = opts if first is None else replace(opts, float_first_layer=first)
        result, info = _quantize(plan, optimized, calib, o, say)
        tag = None if len(firsts) == 1 else ("float" if first else "pixel grid")
        payloads = {CALIBRATION_PAYLOAD: result.ranges}
        qdq = set_batch(result.model, plan.spec.batch)
        prepared.append(
            _mixed(Prepared(qdq, payloads, info, tag, result.float_model), plan, opts.float_layers)
        )
    return prepared


def _mixed(prepared: Prepared, plan: Plan, float_layers: Sequence[str]) -> Prepared:
    """``prepared`` (all INT8) with ``float_layers`` in float, checked against its layers; the
    quantization section then maps every layer to its precision."""
    assert prepared.float_model is not None and prepared.quantization is not None
    qdq, opts = prepared.model, plan.opts
    known = [layer.name for layer in layers(qdq)]
    names = check_names(float_layers, known)
    check_names(opts.int8_layers, known)
    if clash := sorted(set(names) & set(opts.int8_layers)):
        raise QuenchError(f"layer(s) asked both in float and in INT8: {', '.join(clash)}")
    model = with_float_layers(qdq, prepared.float_model, names)
    info = {
        **prepared.quantization,
        "quantized_nodes": quantized_counts(model),
        "float_layers": names,
        "int8_layers": list(opts.int8_layers),
        "layers": {layer.name: layer.precision for layer in layers(model)},
    }
    return replace(prepared, model=model, quantization=info)


def _quantize(
    plan: Plan,
    optimized: onnx.ModelProto,
    calib: CalibrationSet,
    opts: BuildOptions,
    say: Log,
) -> tuple[QuantResult, dict[str, Any]]:
    """Calibrate on ``calib`` (or reuse the cache) and quantize ``optimized``: the result (QDQ
    model, ranges, float graph) and the manifest's quantization section."""
    config = QuantConfig()
    if opts.calib_method:
        config.method = opts.calib_method
    if opts.bias_correction is not None:
        config.bias_correction = opts.bias_correction
    if plan.preset.data.layout == "NCHW":
        config.input_grid = plan.preset.data.channel_mean_std()
    # None (the default): the first conv on the pixel grid (GPTQ-rounded) where it fits
    config.float_first_layer = opts.float_first_layer
    config.weight_bits = 8 if opts.target == "native" and int8_accumulates_in_int32() else 7
    source = Source.of(plan.src.sha256, calib.digest, calib.describe(), config)
    key = source.key
    cache_file = (
        Path(opts.calib_cache) if opts.calib_cache else cache_dir() / "calibration" / f"{key}.json"
    )
    cached = ranges_cache.read(cache_file, key, say)
    say(
        f"calibration: {len(calib.files)} images, method {config.method}"
        + (f", reusing ranges from {cache_file}" if cached else "")
    )
    # one BLAS thread while NumPy computes (GPTQ's patch moments and Cholesky factor)
    with Bar("quantizing", None, enabled=opts.progress) as bar, one_blas_thread():
        result = quantize(
            optimized,
            plan.spec.input_name,
            calib.tensor,
            config,
            cache=cached,
            progress=lambda done, total: bar.advance(1),
            source=source,
        )
    if not cached:
        ranges_cache.write(cache_file, result.ranges, say)
    info = {
        **result.info,
        "target": opts.target,
        "int8_exact_on": (
            PORTABLE_CLASSES
            if config.weight_bits == 7
            else "VNNI/AMX x86-64 and ARM only (not AVX2 or AVX-512 without VNNI)"
        ),
        "calibration": {**calib.describe(), "files_skipped": calib.skipped[:20]},
        "cache": {"key": key, "reused": bool(cached)},
    }
    return result, info


# -- compile and select (quench.builder.engines) --------------------------------------------


def _compile_and_select(plan: Plan, prepared: list[Prepared], say: Log) -> Selection:
    """Every candidate engine compiles every prepared model, each checked against the source
    model; when there is a choice, the candidates are timed and ranked, fastest first."""
    opts, spec, shape = plan.opts, plan.spec, plan.preset.data.input_shape
    reference = Reference.of(plan.fixed, spec, shape)
    auto = opts.engine == "auto"
    candidates = compile_candidates(
        prepared, plan.engines, spec, reference, auto, say, plan.src.path
    )
    if len(plan.engines) == 1 and len(prepared) == 1 and len(candidates) == 1:
        return Selection.unranked(candidates)  # nothing to choose between
    return choose(candidates, spec, plan.data.input_shape, opts, say)


# -- accept: the first candidate that passes the fidelity gate and the accuracy check -------


def _accept(
    plan: Plan,
    selection: Selection,
    probe: Probe,
    output: Path,
    timings: dict[str, float],
    say: Log,
) -> tuple[Manifest, artifact.Artifact, Model]:
    """The first candidate, in ranked order, that passes the fidelity gate (and the accuracy
    check, when asked for): its manifest, artifact and loaded model. When the last one fails,
    so does the build, saying what to try."""
    opts, ranked = plan.opts, selection.ranked
    base = _manifest(plan)
    for rank, candidate in enumerate(ranked):
        if len(ranked) > 1:
            say(f"{'chose' if rank == 0 else 'next'}: {candidate.describe()}")
        v = candidate.verification
        say(
            f"checked against the source model on random input: max |diff| "
            f"{v['max_abs_diff']:.2e}, top-1 agreement {v['top1_agreement']:.0%}"
        )
        manifest = _with_candidate(base, plan, candidate, selection)
        payloads = {**candidate.prepared.payloads, **candidate.compiled.payloads}
        art = artifact.Artifact(manifest.to_dict(), payloads)
        built = Model(art, path=output, threads=opts.threads)
        try:
            _check(built, manifest, art, candidate, plan, probe, timings, say)
        except (FidelityError, AccuracyGateError) as exc:
            built.close()
            if rank + 1 < len(ranked):
                say(f"{candidate.engine.name} rejected: {exc}; trying the next fastest candidate")
                continue
            raise
        return manifest, art, built
    raise QuenchError("no candidate to check")  # compile_candidates returns at least one


# -- repair: the fewest most sensitive layers in float (quench.builder.repair) ---------------


def _repairable(plan: Plan, selection: Selection) -> bool:
    prepared = selection.ranked[0].prepared
    if reduced.repairable(plan.precision, selection.ranked[0], plan.opts.repair):
        return True
    return plan.opts.repair and plan.precision.is_int8 and prepared.float_model is not None


def _repair(
    plan: Plan,
    selection: Selection,
    probe: Probe,
    calib: CalibrationSet | None,
    failure: QuenchError,
    say: Log,
) -> Prepared:
    """Rank the quantized layers by sensitivity on calibration images, then search the fewest
    top-ranked layers in float that pass the bounds (judged with the chosen engine on the
    images each bound names); :class:`AccuracyGateError` or :class:`FidelityError` (nothing
    written) with the best mix found when none does."""
    opts, chosen = plan.opts, selection.ranked[0]
    if plan.precision.family == "half":  # bf16 / fp16: layers kept in fp32 (builder.reduced)
        check = _check_set(plan, probe) if opts.check_images else None
        x, ref, where = reduced.ranking_set(plan, calib, probe)
        return reduced.repaired(chosen, plan.spec, probe, x, ref, where, opts, failure, check, say)
    assert calib is not None
    prepared = chosen.prepared
    assert prepared.float_model is not None
    qdq, float_model = plan.at_reference_batch(prepared.model), prepared.float_model
    pinned = set(opts.int8_layers)
    names = [x.name for x in layers(qdq) if x.precision == "int8" and x.name not in pinned]
    say(f"{failure}; ranking {len(names)} quantized layers by sensitivity")
    x = calib.tensor[:SENSITIVITY_IMAGES]
    t = time.perf_counter()
    base, each, ranking = _rank_layers(plan, qdq, float_model, x, names)
    rank_seconds = time.perf_counter() - t
    judge = _judge(plan, selection, probe)
    t = time.perf_counter()
    with Bar("searching float layers", None, enabled=opts.progress):
        plan_ = repair.search(ranking, judge, say)
    record = {
        "failure": str(failure),
        "sensitivity_images": len(x),
        "all_int8": base.to_dict(),
        "ranking": [{"name": n, **each[n].to_dict()} for n in ranking],
        "steps": [s.to_dict() for s in plan_.steps],
        "seconds": {"rank": round(rank_seconds, 2), "search": round(time.perf_counter() - t, 2)},
    }
    best = plan_.best
    if plan_.float_layers is None:
        figures = "; ".join(f"{a} {b}" for a, b in best.verdict.figures.items()) if best else ""
        kept = ", ".join(ranking[: best.float_layers]) if best else ""
        raise type(failure)(
            f"{failure}; no mix of float layers meets the bound: the best found keeps "
            f"{best.float_layers if best else 0} of {len(ranking)} layers in float ({figures})"
            + (f": {kept}" if kept and best and best.float_layers <= 10 else "")
        )
    chosen_layers = [*opts.float_layers, *plan_.float_layers]
    say(f"keeping {len(plan_.float_layers)} layer(s) in float: {', '.join(plan_.float_layers)}")
    repaired = _mixed(prepared, plan, chosen_layers)
    assert repaired.quantization is not None
    repaired.quantization["repair"] = {**record, "float_layers": plan_.float_layers}
    return repaired


def _rank_layers(
    plan: Plan,
    qdq: onnx.ModelProto,
    float_model: onnx.ModelProto,
    x: np.ndarray,
    names: Sequence[str],
) -> tuple[sensitivity.Effect, dict[str, sensitivity.Effect], list[str]]:
    """The all-INT8 model's effect on ``x``, each layer's effect in float alone, and the layers
    most sensitive first (the repair's ranking and ``quench diagnose``'s)."""
    spec = plan.spec
    ref = sensitivity.run(plan.dynamic, spec.input_name, x)[spec.output_name]
    with Bar("ranking layers by sensitivity", len(names), enabled=plan.opts.progress) as bar:
        base, each = sensitivity.sensitivity(
            qdq, float_model, spec.input_name, spec.output_name, x, ref, names, bar.advance
        )
    return base, each, sensitivity.rank(base, each)


def _judge(plan: Plan, selection: Selection, probe: Probe) -> repair.Judge:
    """What a repair step asks of a mix: compiled by the chosen engine with its options, its
    top-1 agreement with fp32 on the probe (the fidelity gate's bound) and, with check images,
    its top-1 drop there (the accuracy check's bound)."""
    opts, chosen, spec = plan.opts, selection.ranked[0], plan.spec
    prepared = chosen.prepared
    assert prepared.float_model is not None
    check = _check_set(plan, probe) if opts.check_images else None
    base = _manifest(plan)

    def judge(names: Sequence[str]) -> repair.Verdict:
        model = with_float_layers(prepared.model, prepared.float_model, names)
        compiled = chosen.engine.compile(model, spec)
        compiled.options.update(chosen.variant)
        candidate = Candidate(chosen.engine, compiled, chosen.variant, {}, Prepared(model))
        manifest = _with_candidate(base, plan, candidate, selection)
        art = artifact.Artifact(manifest.to_dict(), compiled.payloads)
        with Model(art, threads=opts.threads) as built:
            agree = fidelity(built.predict(probe.x), probe.reference)["top1_agreement"]
            figures: dict[str, Any] = {"top1_agreement": round(agree, 4)}
            passed = agree >= opts.min_top1_agreement
            score = agree - opts.min_top1_agreement
            if check is not None:
                drop = round(check.drop(built.predict(check.x)), 4)  # as the check rounds
                figures["top1_drop_points"] = round(drop, 4)
                if opts.max_top1_drop is not None:
                    passed = passed and drop <= opts.max_top1_drop
                    score = min(score, (opts.max_top1_drop - drop) / 100)
        return repair.Verdict(figures, passed, score)

    return judge


def _check_set(plan: Plan, probe: Probe) -> repair.CheckSet:
    """The check images, preprocessed once, with the fp32 source model's top-1 (from the
    accuracy check's predictions when it made them)."""
    opts, spec = plan.opts, plan.spec
    assert opts.check_images is not None
    truth = read_ground_truth(opts.check_labels) if opts.check_labels else None
    x, labels, kept = repair.read_check_images(  # the artifact's input (uint8: pixels)
        list_images(opts.check_images), plan.data, truth, opts.progress
    )
    known = {str(Path(p.source).resolve()): p.classes[0] for p in probe.fp32_check or [] if p.ok}
    top1 = [known.get(str(p.resolve()), -1) for p in kept]
    if min(top1, default=-1) < 0:  # not all predicted by the accuracy check: run fp32 here
        fx = Normalizer(plan.preset.data).batch(x) if plan.data.pixels else x
        top1 = sensitivity.run(plan.dynamic, spec.input_name, fx)[spec.output_name].argmax(1)
    return repair.CheckSet(x, np.asarray(top1), labels)


def _manifest(plan: Plan) -> Manifest:
    """The manifest's candidate-independent part (engine and precision details come later)."""
    opts, src, preset, data = plan.opts, plan.src, plan.preset, plan.data
    shape, batch = preset.data.input_shape, plan.spec.batch  # the source model's input
    return Manifest(
        name=opts.name or artifact_name(preset, plan.preset_how, src.path),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        quench_version=__version__,
        source={
            **src.describe(),
            **({"rewrites": [r.to_dict() for r in plan.rewrites]} if plan.rewrites else {}),
            **({"batch": plan.form.to_dict()} if plan.form is not None else {}),
        },
        preset={"name": preset.name, "chosen": plan.preset_how},
        model={
            "macs_per_image": count_macs(plan.dynamic, shape),
            "parameters": sum(
                int(np.prod(t.dims)) for t in src.model.graph.initializer if t.data_type == 1
            ),
        },
        io=IO(
            Tensor(plan.spec.input_name, data.input_dtype, (batch or "N", *data.input_shape)),
            Tensor(plan.spec.output_name, "float32", (batch or "N", len(plan.labels))),
        ),
        batch=Batch.of(batch),
        preprocess=data,
        output_kind=plan.output_kind,
        labels=plan.labels,
        build=_settings(opts),
        host=cpu_info(),
        precision=PrecisionInfo(plan.precision),
        engine=EngineInfo("", ""),
    )


def _with_candidate(
    base: Manifest, plan: Plan, candidate: Candidate, selection: Selection
) -> Manifest:
    """``base`` with the candidate's engine, precision details, checks and quantization."""
    engine, compiled, tag = candidate.engine, candidate.compiled, candidate.prepared.first_layer
    return replace(
        base,
        precision=PrecisionInfo(plan.precision, dict(compiled.info)),
        engine=EngineInfo(engine.name, engine.version(), compiled.options),
        verification=candidate.verification,
        engine_selection={
            "requested": plan.opts.engine,
            "chosen": engine.name,
            **({"first_layer": tag} if tag else {}),
            "candidates": list(selection.records),
            **selection.summary,
        },
        quantization=candidate.prepared.quantization,
        reduced_precision=candidate.prepared.reduced,
    )


def _settings(opts: BuildOptions) -> dict[str, Any]:
    """The options as given (calibration ones only for INT8 builds)."""
    skip = {"progress", "select_seconds", "select_budget"}
    if not Precision.parse(opts.precision).is_int8:
        skip |= {
            "calib_method",
            "calib_cache",
            "bias_correction",
            "float_first_layer",
            "target",
        }
    if Precision.parse(opts.precision).family == "float32":
        skip.add("repair")  # bf16 / fp16 builds repair themselves too
    if not opts.calib_images:
        skip.add("calib_count")
    if not opts.fp16_compute:
        skip.add("fp16_compute")
    if opts.input == "float32":  # the default: float artifacts' manifests as before
        skip.add("input")
    return {k: v for k, v in asdict(opts).items() if v not in (None, {}, ()) and k not in skip}


def _check(
    built: Model,
    manifest: Manifest,
    art: artifact.Artifact,
    candidate: Candidate,
    plan: Plan,
    probe: Probe,
    timings: dict[str, float],
    say: Log,
) -> None:
    """The fidelity gate, the self-check record and the accuracy check of one candidate, written
    into its manifest and artifact (the fp32 model's predictions on the check images are
    computed once per build and kept on ``probe``, whether the candidate passes or not)."""
    opts, n = plan.opts, SELFCHECK_IMAGES
    manifest.fidelity, out = _fidelity_gate(built, probe, opts, say)
    section, payloads = record_selfcheck(
        probe.x[:n],
        probe.reference[:n],
        out[:n],
        probe.source,
        candidate.engine.name,
        candidate.engine.version(),
        opts.min_top1_agreement,
    )
    manifest.selfcheck = section
    art.payloads.update(payloads)
    if opts.check_images:
        with _timed(timings, "accuracy_check"):
            manifest.accuracy = _accuracy_check(built, plan.dynamic, opts, say, probe)


def _probe(plan: Plan, calib: CalibrationSet | None) -> Probe:
    """The images the fidelity gate and the self-check run: calibration images held out of the
    calibration (INT8) or all of them (float builds), else a random batch (a smoke test); in
    the form in which the artifact keeps its self-check inputs (float16-rounded tensors, or
    uint8 pixels for ``--input uint8``), with the fp32 source model's outputs (ONNX Runtime,
    dynamic batch) on the same images."""
    int8, pixels = plan.precision.is_int8, plan.data.pixels
    x, kind = None, "random input"
    if calib is not None:
        if pixels:
            x = calib.held_out_pixels if int8 else calib.pixels
        else:
            x = calib.held_out if int8 else calib.tensor
        kind = f"held-out {calib.kind}" if int8 else calib.kind
    n = max(8, plan.spec.batch or 0)
    if x is None or not len(x):
        if pixels:
            x = random_batch(plan.data.input_shape, n, "uint8")
        else:
            x = np.random.default_rng(0).standard_normal((n, *plan.preset.data.input_shape))
        kind = "random input"
    if pixels:  # the source model takes them normalised, as the pipeline does it
        x = np.asarray(x, np.uint8)
        source_x = Normalizer(plan.preset.data).batch(x)
    else:
        x = source_x = np.asarray(x).astype(np.float16).astype(np.float32)
    spec = plan.spec
    with OnnxRuntimeRunner(plan.dynamic.SerializeToString()) as ref:
        out = [
            ref.infer({spec.input_name: source_x[i : i + 8]})[spec.output_name]
            for i in range(0, len(source_x), 8)
        ]
    return Probe(x, np.concatenate(out), kind)


def _reference_model(source: onnx.ModelProto, built: Model) -> Model:
    """The fp32 source model (dynamic batch) on ONNX Runtime, with the built model's
    preprocessing (done by the pipeline: float32 input, whatever the built model takes)."""
    engine = OnnxRuntimeEngine()
    spec = CompileSpec(FORCE_FLOAT32.name, built.input_name, built.output_name, None)
    compiled = engine.compile(source, spec)
    manifest = built.spec.with_float_input().with_engine(
        EngineInfo(engine.name, engine.version(), compiled.options), batch=None
    )
    return Model(artifact.Artifact(manifest.to_dict(), compiled.payloads), threads=built.threads)


def _accuracy_check(
    built: Model,
    source: onnx.ModelProto,
    opts: BuildOptions,
    say: Log,
    probe: Probe,
) -> dict[str, Any]:
    """Top-1/top-5 of the built model and of fp32 (``source``, dynamic batch) on the check
    images; gate on the drop. fp32 runs once per build: its predictions stay on ``probe``."""
    assert opts.check_images is not None
    paths = list_images(opts.check_images)
    if not paths:
        raise QuenchError(f"{opts.check_images}: no check images")
    if probe.fp32_check is None:
        reference = _reference_model(source, built)
        with Bar("checking accuracy (fp32)", len(paths), enabled=opts.progress) as bar:
            probe.fp32_check = list(
                reference.iter_classify(paths, topk=5, on_done=lambda p: bar.advance())
            )
        reference.close()
    ref_preds = probe.fp32_check
    with Bar(f"checking accuracy ({opts.precision})", len(paths), enabled=opts.progress) as bar:
        preds = list(built.iter_classify(paths, topk=5, on_done=lambda p: bar.advance()))
    if opts.check_labels:
        truth = read_ground_truth(opts.check_labels)
        mode = "labels"
    else:  # agreement with the fp32 model's top-1
        truth = GroundTruth(
            {str(Path(p.source).resolve()): p.classes[0] for p in ref_preds if p.ok}, {}
        )
        mode = "agreement with fp32 top-1"
    ref, got = score(ref_preds, truth), score(preds, truth)
    drop1 = round((ref.top1 - got.top1) * 100, 4)
    drop5 = round((ref.top5 - got.top5) * 100, 4)
    result = {
        "images": got.evaluated,
        "measure": mode,
        "fp32": {"top1": ref.top1, "top5": ref.top5},
        "built": {"top1": got.top1, "top5": got.top5},
        "top1_drop_points": drop1,
        "top5_drop_points": drop5,
        "max_top1_drop_points": opts.max_top1_drop,
        "passed": opts.max_top1_drop is None or drop1 <= opts.max_top1_drop,
    }
    say(
        f"accuracy on {got.evaluated} images ({mode}): fp32 top-1 {ref.top1:.4f} top-5 "
        f"{ref.top5:.4f}; {opts.precision} top-1 {got.top1:.4f} top-5 {got.top5:.4f} "
        f"(top-1 drop {drop1:.2f} points)"
    )
    if not result["passed"]:
        raise AccuracyGateError(
            f"accuracy check failed: top-1 dropped {drop1:.2f} points (fp32 {ref.top1:.4f} -> "
            f"{got.top1:.4f} on {got.evaluated} images), more than --max-top1-drop "
            f"{opts.max_top1_drop}"
        )
    return result


# -- write -----------------------------------------------------------------------------------


def _write(
    manifest: Manifest,
    art: artifact.Artifact,
    built: Model,
    output: str | Path,
    say: Log,
    sign_key: Ed25519PrivateKey | None = None,
) -> Model:
    """Save the accepted artifact to ``output`` (signed with ``sign_key``); the loaded model
    holds the final manifest."""
    art.manifest.update(manifest.to_dict())  # the dict the built Model holds
    # completes it in place (format, payload digests)
    artifact.save(art, output, sign=signing.signer(sign_key) if sign_key else None)
    built.spec = Manifest.from_dict(art.manifest)
    say(f"wrote {output} ({Path(output).stat().st_size / 1e6:.1f} MB)")
    return built
