"""The build steps: load + check -> preset -> (calibrate + quantize) -> set batch -> compile ->
verify -> (accuracy check) -> save."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from quench import __version__, artifact
from quench.backend import ENGINES, Compiled, CompileSpec, Engine, get_engine
from quench.errors import ModelError, QuenchError
from quench.graph import (
    SourceModel,
    count_macs,
    find_io,
    load_model,
    num_classes,
    real_inputs,
    set_batch,
    upgrade_opset,
)
from quench.hw import cpu_info, int8_accumulates_in_int32, one_blas_thread
from quench.labels import load_labels
from quench.manifest import IO, Batch, EngineInfo, Manifest, PrecisionInfo, Tensor
from quench.precision import FORCE_FLOAT32, NAMES, Precision
from quench.presets import Preset, detect_preset, get_preset
from quench.selfcheck import DEFAULT_MIN_TOP1_AGREEMENT, FidelityError, fidelity
from quench.selfcheck import IMAGES as SELFCHECK_IMAGES
from quench.selfcheck import record as record_selfcheck

if TYPE_CHECKING:
    from quench.builder.calibration import CalibrationSet
    from quench.model import Model

PRECISIONS = NAMES  # the --precision names, from quench.precision
TARGETS = ("portable", "native")
# Where 7-bit weights are exact: u8 x s7 pair sums fit int16 (2 x 255 x 64 <= 32767)
PORTABLE_CLASSES = "every CPU: x86-64 (SSE4.1, AVX2, AVX-512 with or without VNNI, AMX) and ARM"

# Engine preference for --engine auto: the first installed engine that runs the precision.
ENGINE_ORDER = ("onnxruntime", "openvino")
CALIBRATION_PAYLOAD = "calibration.json"

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
    batch: int | None = None  # fixed batch size; None = dynamic (mutable) batch
    engine: str = "auto"
    threads: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize: int | None = None
    crop: int | None = None
    interpolation: str | None = None
    channel_order: str | None = None
    layout: str | None = None
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
    # accuracy check at build time
    check_images: str | None = None
    check_labels: str | None = None
    max_top1_drop: float | None = None  # percentage points
    # the fidelity gate: top-1 agreement with fp32 on held-out calibration images
    min_top1_agreement: float = DEFAULT_MIN_TOP1_AGREEMENT
    select_seconds: float = 1.0  # --engine auto: timing per candidate and batch size
    progress: bool = True


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


def candidate_engines(name: str, precision: str) -> list[Engine]:
    """The named engine, or for ``auto`` every installed engine that runs ``precision``."""
    if name != "auto":
        engine = get_engine(name)
        if not engine.supports(precision):
            raise QuenchError(f"engine {engine.name} cannot run precision {precision} on this CPU")
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


def time_candidate(
    engine: Engine, compiled: Compiled, spec: CompileSpec, shape: tuple[int, ...], seconds: float
) -> dict[str, Any]:
    """Images/s of a compiled candidate at the batch sizes it will serve (tactic timing)."""
    from quench.perf import measure

    batches = [spec.batch] if spec.batch else [1, 8]
    qps = {}
    with engine.runner(compiled.payloads, compiled.options, threads=spec.threads) as run:
        for b in batches:
            n, secs, _ = measure(
                lambda x: run.infer({spec.input_name: x}), shape, b, duration=seconds, warmup=2
            )
            qps[str(b)] = round(b * n / secs, 2)
    score = float(np.exp(np.mean(np.log(list(qps.values())))))
    return {"engine": engine.name, "qps_by_batch": qps, "score": round(score, 2)}


def build(
    model: str | Path,
    output: str | Path,
    options: BuildOptions | None = None,
    log: Log | None = None,
    **kwargs: Any,
) -> Model:
    """Build ``model`` into the artifact ``output`` and return it loaded."""
    opts = options or BuildOptions(**kwargs)
    say: Log = log or (lambda msg: None)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    precision = Precision.parse(opts.precision)
    if opts.batch is not None and opts.batch < 1:
        raise QuenchError(f"batch size must be >= 1, got {opts.batch}")
    int8 = precision.is_int8
    if int8 and not opts.calib_images:
        raise QuenchError(f"--precision {opts.precision} needs --calib-images (a folder or list)")
    if opts.target not in TARGETS:
        raise QuenchError(f"unknown target {opts.target!r}; choose one of {', '.join(TARGETS)}")
    if not 0.0 <= opts.min_top1_agreement <= 1.0:
        raise QuenchError(f"--min-top1-agreement must be in [0, 1], got {opts.min_top1_agreement}")
    if opts.check_labels and not opts.check_images:
        raise QuenchError("--check-labels needs --check-images")

    src = load_model(model)
    graph_inputs = [i.name for i in real_inputs(src.model)]
    preset, how = resolve_preset(opts, graph_inputs[0], src.model.graph.output[0].name)
    say(f"preset: {preset.name} ({how})")
    input_name, output_name = find_io(src.model, preset, str(src.path))
    classes = num_classes(src.model, output_name)
    labels = load_labels(opts.labels or preset.labels)
    if classes is not None and len(labels) != classes:
        raise ModelError(
            f"{src.path}: the model has {classes} classes but the label set has {len(labels)}; "
            "pass --labels FILE"
        )
    engines = candidate_engines(opts.engine, opts.precision)
    # (model to compile, payloads it adds, quantization info, first-layer tag)
    sources: list[tuple[onnx.ModelProto, dict[str, bytes], dict[str, Any] | None, str | None]]
    sources = [(src.model, {}, None, None)]
    calib = _calibration_images(opts, preset, say) if opts.calib_images else None
    if int8:
        assert calib is not None
        t = time.perf_counter()
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
        optimized = _optimized(src)
        sources = []
        for first in firsts:
            o = opts if first is None else replace(opts, float_first_layer=first)
            qmodel, calib_payload, qinfo = _quantize(
                src, optimized, input_name, preset, calib, o, say
            )
            tag = None if len(firsts) == 1 else ("float" if first else "pixel grid")
            sources.append((qmodel, {CALIBRATION_PAYLOAD: calib_payload}, qinfo, tag))
        timings["calibrate_quantize"] = round(time.perf_counter() - t, 3)

    spec = CompileSpec(opts.precision, input_name, output_name, opts.batch, opts.threads)
    reference = set_batch(src.model, opts.batch)
    candidates: list[tuple[Engine, Compiled, dict[str, Any], dict[str, Any], int]] = []
    t = time.perf_counter()
    for k, (to_compile, _, _, tag) in enumerate(sources):
        for engine in engines:
            say(
                f"compiling with {engine.name} {engine.version()} ({opts.precision}"
                + (f", first layer {tag})" if tag else ")")
            )
            try:
                compiled = engine.compile(set_batch(to_compile, opts.batch), spec)
                verification = _verify(reference, compiled, engine, spec, preset)
            except QuenchError as exc:
                if len(engines) == 1 and len(sources) == 1:
                    raise
                say(f"  {engine.name} rejected: {exc}")
                continue
            variants = engine.variants(spec) if opts.engine == "auto" else [{}]
            for variant in variants:
                option_set = Compiled(
                    compiled.payloads, {**compiled.options, **variant}, compiled.info
                )
                timing: dict[str, Any] = {"engine": engine.name}
                if len(engines) > 1 or len(variants) > 1 or len(sources) > 1:
                    timing = time_candidate(
                        engine, option_set, spec, preset.data.input_shape, opts.select_seconds
                    )
                    timing["options"] = variant
                    say(
                        f"  {engine.name} {variant or ''}: {timing['qps_by_batch']} images/s "
                        "by batch"
                    )
                if tag:
                    timing["first_layer"] = tag
                candidates.append((engine, option_set, verification, timing, k))
    if not candidates:
        raise QuenchError(f"no engine could build {opts.precision} for {src.path}")
    candidates.sort(key=lambda c: -c[3].get("score", 0.0))
    timings["compile_and_select"] = round(time.perf_counter() - t, 3)
    base = Manifest(
        name=opts.name or artifact_name(preset, how, src.path),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        quench_version=__version__,
        source=src.describe(),
        preset={"name": preset.name, "chosen": how},
        model={
            "macs_per_image": count_macs(src.model, preset.data.input_shape),
            "parameters": sum(
                int(np.prod(t.dims)) for t in src.model.graph.initializer if t.data_type == 1
            ),
        },
        io=IO(
            Tensor(input_name, "float32", (opts.batch or "N", *preset.data.input_shape)),
            Tensor(output_name, "float32", (opts.batch or "N", len(labels))),
        ),
        batch=Batch.of(opts.batch),
        preprocess=preset.data,
        output_kind=preset.output_kind,
        labels=labels,
        build=_settings(opts),
        host=cpu_info(),
        precision=PrecisionInfo(precision),
        engine=EngineInfo("", ""),
    )
    from quench.model import Model

    probe, probe_source = _fidelity_inputs(calib, int8, preset, opts.batch)
    probe_ref = _fp32_outputs(src.model, input_name, output_name, probe)
    reference_preds: list[Any] | None = None
    for rank, (engine, compiled, verification, _, k) in enumerate(candidates):
        _, payloads, quant_info, tag = sources[k]
        if len(candidates) > 1:
            say(
                f"{'chose' if rank == 0 else 'next'}: {engine.name} {compiled.options}"
                + (f", first layer {tag}" if tag else "")
            )
        say(
            f"checked against the source model on random input: max |diff| "
            f"{verification['max_abs_diff']:.2e}, "
            f"top-1 agreement {verification['top1_agreement']:.0%}"
        )
        manifest = replace(
            base,
            precision=PrecisionInfo(precision, dict(compiled.info)),
            engine=EngineInfo(engine.name, engine.version(), compiled.options),
            verification=verification,
            engine_selection={
                "requested": opts.engine,
                "chosen": engine.name,
                **({"first_layer": tag} if tag else {}),
                "candidates": [c[3] for c in candidates],
            },
            quantization=quant_info,
        )
        art = artifact.Artifact(manifest.to_dict(), {**payloads, **compiled.payloads})
        built = Model(art, path=Path(output), threads=opts.threads)
        try:
            manifest.fidelity, probe_out = _fidelity_gate(
                built, probe, probe_ref, probe_source, opts, say
            )
            section, check_payloads = record_selfcheck(
                probe[:SELFCHECK_IMAGES],
                probe_ref[:SELFCHECK_IMAGES],
                probe_out[:SELFCHECK_IMAGES],
                probe_source,
                engine.name,
                engine.version(),
                opts.min_top1_agreement,
            )
            manifest.selfcheck = section
            art.payloads.update(check_payloads)
            if opts.check_images:
                t = time.perf_counter()
                try:
                    manifest.accuracy, reference_preds = _accuracy_check(
                        built, src, opts, say, reference_preds
                    )
                finally:
                    timings["accuracy_check"] = round(
                        timings.get("accuracy_check", 0.0) + time.perf_counter() - t, 3
                    )
        except (FidelityError, AccuracyGateError) as exc:
            built.close()
            if rank + 1 < len(candidates):
                say(f"{engine.name} rejected: {exc}; trying the next fastest candidate")
                continue
            written = "artifact not written"
            if isinstance(exc, FidelityError):
                written += f". {_fidelity_hint(opts)}"
            raise type(exc)(f"{exc}; {written}") from None
        break
    manifest.timings = timings
    manifest.build_seconds = round(time.perf_counter() - started, 3)
    art.manifest.update(manifest.to_dict())  # the dict the built Model holds
    artifact.save(art, output)  # completes it in place (format, payload digests)
    built.spec = Manifest.from_dict(art.manifest)
    say(f"wrote {output} ({Path(output).stat().st_size / 1e6:.1f} MB)")
    return built


def _settings(opts: BuildOptions) -> dict[str, Any]:
    """The options as given (calibration ones only for INT8 builds)."""
    skip = {"progress", "select_seconds"}
    if not Precision.parse(opts.precision).is_int8:
        skip |= {
            "calib_method",
            "calib_cache",
            "bias_correction",
            "float_first_layer",
            "target",
        }
    if not opts.calib_images:
        skip.add("calib_count")
    return {k: v for k, v in asdict(opts).items() if v not in (None, {}, ()) and k not in skip}


def _calibration_images(opts: BuildOptions, preset: Preset, say: Log) -> CalibrationSet:
    """Read the calibration images through the preset's preprocessing (once per build)."""
    from quench.builder.calibration import load_calibration

    assert opts.calib_images is not None
    calib = load_calibration(
        opts.calib_images, preset.data, opts.calib_count, progress=opts.progress, warn=say
    )
    if opts.check_images:
        overlap = set(calib.files) & {str(p) for p in _check_paths(opts.check_images)}
        if overlap:
            say(
                f"warning: {len(overlap)} calibration images are also check images: "
                "the accuracy check will look better than it is"
            )
    return calib


def _fidelity_inputs(
    calib: CalibrationSet | None, int8: bool, preset: Preset, batch: int | None
) -> tuple[np.ndarray, str]:
    """The images the fidelity gate and the self-check run: calibration images held out of the
    calibration (INT8) or all of them (float builds), else a random batch (a smoke test);
    rounded to float16, the form in which the artifact keeps its self-check inputs."""
    x, kind = None, "random input"
    if calib is not None:
        x = calib.held_out if int8 else calib.tensor
        kind = f"held-out {calib.kind}" if int8 else calib.kind
    if x is None or not len(x):
        rng = np.random.default_rng(0)
        x, kind = (
            rng.standard_normal((max(8, batch or 0), *preset.data.input_shape)),
            "random input",
        )
    return np.asarray(x).astype(np.float16).astype(np.float32), kind


def _fp32_outputs(
    model: onnx.ModelProto, input_name: str, output_name: str, x: np.ndarray
) -> np.ndarray:
    """The fp32 source model's outputs for ``x`` (ONNX Runtime, dynamic batch)."""
    from quench.backend.onnxruntime.runner import OnnxRuntimeRunner

    with OnnxRuntimeRunner(set_batch(model, None).SerializeToString()) as ref:
        return np.concatenate(
            [ref.infer({input_name: x[i : i + 8]})[output_name] for i in range(0, len(x), 8)]
        )


def _fidelity_gate(
    built: Model,
    x: np.ndarray,
    ref: np.ndarray,
    source: str,
    opts: BuildOptions,
    say: Log,
) -> tuple[dict[str, Any], np.ndarray]:
    """Fidelity of ``built`` against fp32 on ``x`` and its outputs; :class:`FidelityError`
    below the bound."""
    got = built.predict(x)
    figures = fidelity(got, ref)
    result = {
        "images": len(x),
        "source": source,
        **figures,
        "min_top1_agreement": opts.min_top1_agreement,
        "passed": figures["top1_agreement"] >= opts.min_top1_agreement,
    }
    say(
        f"fidelity on {len(x)} {source}: top-1 agreement with fp32 "
        f"{figures['top1_agreement']:.1%}, output SQNR {figures['sqnr_db']:.1f} dB"
        + ("" if result["passed"] else f" (bound {opts.min_top1_agreement:.0%})")
    )
    if not result["passed"]:
        raise FidelityError(
            f"fidelity check failed: top-1 agreement with fp32 {figures['top1_agreement']:.1%} "
            f"on {len(x)} {source}, below --min-top1-agreement {opts.min_top1_agreement:g}"
        )
    return result, got


def _fidelity_hint(opts: BuildOptions) -> str:
    """What to try after a failed fidelity check."""
    tries = []
    if Precision.parse(opts.precision).is_int8:
        if opts.target == "native":
            tries.append("--target portable")
        if not opts.float_first_layer:
            tries.append("--float-first-layer")
        tries.append("another --calib-method")
    if opts.engine == "auto":
        tries.append("--engine onnxruntime or openvino")
    tries.append("a higher precision")
    return "Try " + ", ".join(tries) + " (or lower --min-top1-agreement if this is expected)."


def _optimized(src: SourceModel) -> onnx.ModelProto:
    """The graph quantization starts from: opset 13, dynamic batch, BN folded (ORT basic)."""
    from quench.backend.onnxruntime.loader import optimize

    return optimize(upgrade_opset(set_batch(src.model, None), 13), level="basic")


def _quantize(
    src: SourceModel,
    optimized: onnx.ModelProto,
    input_name: str,
    preset: Preset,
    calib: CalibrationSet,
    opts: BuildOptions,
    say: Log,
) -> tuple[onnx.ModelProto, bytes, dict[str, Any]]:
    """Calibrate on ``calib`` (or reuse the cache) and return the QDQ model of ``optimized``."""
    from quench.builder.quantize import QuantConfig, Source, cache, quantize
    from quench.progress import Bar
    from quench.zoo.fetch import cache_dir

    config = QuantConfig()
    if opts.calib_method:
        config.method = opts.calib_method
    if opts.bias_correction is not None:
        config.bias_correction = opts.bias_correction
    if preset.data.layout == "NCHW":
        config.input_grid = preset.data.channel_mean_std()
    # None (the default): the first conv on the pixel grid (GPTQ-rounded) where it fits
    config.float_first_layer = opts.float_first_layer
    config.weight_bits = 8 if opts.target == "native" and int8_accumulates_in_int32() else 7
    source = Source.of(src.sha256, calib.digest, calib.describe(), config)
    key = source.key
    cache_file = (
        Path(opts.calib_cache) if opts.calib_cache else cache_dir() / "calibration" / f"{key}.json"
    )
    cached = cache.read(cache_file, key, say)
    say(
        f"calibration: {len(calib.files)} images, method {config.method}"
        + (f", reusing ranges from {cache_file}" if cached else "")
    )
    # one BLAS thread while NumPy computes (GPTQ's patch moments and Cholesky factor)
    with Bar("quantizing", None, enabled=opts.progress) as bar, one_blas_thread():
        result = quantize(
            optimized,
            input_name,
            calib.tensor,
            config,
            cache=cached,
            progress=lambda done, total: bar.advance(1),
            source=source,
        )
    if not cached:
        cache.write(cache_file, result.ranges, say)
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
    return result.model, result.ranges, info


def _check_paths(spec: str) -> list[Path]:
    from quench.evaluate import list_images

    return list_images(spec)


def _reference_model(src: SourceModel, built: Model) -> Model:
    """The fp32 source model on ONNX Runtime, with the built model's preprocessing."""
    from quench.backend.onnxruntime.loader import OnnxRuntimeEngine
    from quench.model import Model

    engine = OnnxRuntimeEngine()
    spec = CompileSpec(FORCE_FLOAT32.name, built.input_name, built.output_name, None)
    compiled = engine.compile(set_batch(src.model, None), spec)
    manifest = built.spec.with_engine(
        EngineInfo(engine.name, engine.version(), compiled.options), batch=None
    )
    return Model(artifact.Artifact(manifest.to_dict(), compiled.payloads), threads=built.threads)


def _accuracy_check(
    built: Model,
    src: SourceModel,
    opts: BuildOptions,
    say: Log,
    reference_preds: list[Any] | None = None,
) -> tuple[dict[str, Any], list[Any]]:
    """Top-1/top-5 of the built model and of fp32 on the check images; gate on the drop."""
    from quench.evaluate import GroundTruth, read_ground_truth, score
    from quench.progress import Bar

    assert opts.check_images is not None
    paths = _check_paths(opts.check_images)
    if not paths:
        raise QuenchError(f"{opts.check_images}: no check images")
    if reference_preds is None:
        reference = _reference_model(src, built)
        with Bar("checking accuracy (fp32)", len(paths), enabled=opts.progress) as bar:
            reference_preds = list(
                reference.iter_classify(paths, topk=5, on_done=lambda p: bar.advance())
            )
        reference.close()
    ref_preds = reference_preds
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
    return result, ref_preds


def _verify(
    model: onnx.ModelProto, compiled: Compiled, engine: Engine, spec: CompileSpec, preset: Preset
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
    if spec.precision == FORCE_FLOAT32.name and diff > 1e-3 * max(1.0, scale):
        raise ModelError(f"compiled fp32 model differs from the source by {diff:.3g}")
    if not np.all(np.isfinite(got)):
        raise ModelError("the compiled model produces non-finite outputs")
    return {"batch": n, "max_abs_diff": diff, "max_abs_reference": scale, "top1_agreement": agree}
