"""Throughput and latency per batch size (like MagicMind's ``mm_run``), with share of peak.

The share of peak is ``MACs per image x images/s / peak MACs/s``; the peak is worked out from
the CPU's ISA flags, its core count and its core clock, measured (``quench.clock``; see
``peak_macs``). A share above 100% is never shown: it means the peak is wrong.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from quench.backend.onnxruntime.loader import session
from quench.errors import ImageError, QuenchError
from quench.graph import count_macs, load_model
from quench.hw import clock_hz, clock_source, cpu_info, default_threads
from quench.imaging import Normalizer, load_pixels
from quench.manifest import PrecisionInfo
from quench.progress import Bar
from quench.stats import instability, split, spread, watch_load

ROUNDS = 5  # rounds per figure by default, alternating between the configurations
PERCENTILES = (50, 90, 99)

# MACs per cycle per core, by what the CPU can do (see README "Share of peak").
_FP32_MACS = {"avx512_full": 32, "avx512_half": 16, "avx2": 16, "sse": 4}


@dataclass
class PerfResult:
    model: str
    precision: str
    engine: str
    batch: int
    threads: int
    iterations: int
    seconds: float
    qps: float
    latency_ms: dict[str, float]
    compute: str  # float32 | bfloat16 | float16 | int8
    macs_per_image: int | None = None
    peak_share: float | None = None
    device: str = "cpu"
    requests: int = 1  # requests in flight at once, each a whole batch
    rounds: list[dict[str, float]] = field(default_factory=list)  # per round: qps, seconds
    qps_spread: dict[str, float] | None = None  # min/median/mean/max/cv of the round qps
    machine_load: dict[str, Any] | None = None  # other work during the run (quench.stats)
    warnings: list[str] = field(default_factory=list)  # why the figure may be unreliable
    streams: int | None = None  # the engine's parallel streams, when set (--streams)
    inputs: str = "random"  # what was timed: random data, or "N images" (--input-images)

    @property
    def unstable(self) -> bool:
        return bool(self.warnings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The perf table (``quench perf``, the ``quench run`` report): MagicMind's mm_run columns.
PERF_COLUMNS = (
    "Model",
    "Quant_Mode",
    "Batch_Size",
    "Throughput (qps)",
    "device",
    "qps range (CV)",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "% of peak",
)


def perf_row(r: dict[str, Any]) -> list[str]:
    """One ``PerfResult.to_dict()`` as the cells of ``PERF_COLUMNS``."""
    lat = r["latency_ms"]
    requests = r.get("requests", 1)
    s = r.get("qps_spread")
    unstable = "!" if r.get("warnings") else ""
    return [
        r["model"],
        r["precision"],
        str(r["batch"]),
        f"{r['qps']:.2f}{unstable}",
        f"cpu ({r['engine']}, {r['threads']} threads"
        + (f", {r['streams']} streams" if r.get("streams") else "")
        + (f", {requests} requests)" if requests > 1 else ")"),
        f"{s['min']:.1f}-{s['max']:.1f} ({s['cv']:.1%})" if s else "-",
        f"{lat['p50']:.2f}",
        f"{lat['p90']:.2f}",
        f"{lat['p99']:.2f}",
        f"{r['peak_share']:.1%}" if r.get("peak_share") is not None else "-",
    ]


def startup_line(t: dict[str, Any], batch: int) -> str:
    """benchmark_app's "Read model took", "Compile model took", "First inference took"."""

    def ms(key: str) -> str:
        v = t.get(key)
        return "-" if v is None else f"{v:.1f} ms"

    note = f" ({t['note']})" if t.get("note") else ""
    return (
        f"load {ms('load_ms')}, compile {ms('compile_ms')}{note}, first inference "
        f"{ms('first_inference_ms')} (batch {batch})"
    )


def latency_line(r: dict[str, Any], percentiles: tuple[float, ...] = PERCENTILES) -> str:
    """trtexec's latency summary of one result: min, max, mean, median and percentiles."""
    lat = r["latency_ms"]
    pcts = ", ".join(
        f"percentile({p:g}%) = {lat[percentile_key(p)]:.3f} ms" for p in percentiles if p != 50
    )
    return (
        f"batch {r['batch']}: latency min = {lat['min']:.3f} ms, max = {lat['max']:.3f} ms, "
        f"mean = {lat['mean']:.3f} ms, median = {lat['p50']:.3f} ms" + (f", {pcts}" if pcts else "")
    )


def fp32_macs_per_cycle(info: dict[str, Any]) -> tuple[int, str]:
    """fp32 FMA lanes x FMA pipes per cycle per core, from the CPU family and flags."""
    flags = set(info.get("flags", []))
    vendor_family = (info.get("vendor"), info.get("family"))
    if "avx512f" in flags:
        # AMD Zen 4 (family 25) executes 512-bit FMAs on 256-bit pipes; Zen 5 (26) and Intel
        # server cores with two FMA units do two full 512-bit FMAs per cycle.
        if vendor_family == ("AuthenticAMD", 25):
            return _FP32_MACS["avx512_half"], "AVX-512 on 2x256-bit FMA pipes (Zen 4)"
        return _FP32_MACS["avx512_full"], "AVX-512, 2 FMA pipes x 16 fp32 lanes"
    if "avx2" in flags and "fma" in flags:
        return _FP32_MACS["avx2"], "AVX2, 2 FMA pipes x 8 fp32 lanes"
    return _FP32_MACS["sse"], "SSE"


def peak_macs(compute: str, threads: int | None = None) -> tuple[float, str]:
    """Peak MACs/s of this CPU for a compute precision, and how it was worked out."""
    info = cpu_info()
    flags = set(info.get("flags", []))
    base, how = fp32_macs_per_cycle(info)
    factor, why = 1, "fp32 FMA"
    if compute == "bfloat16" and "amx_bf16" in flags:
        factor, why = 32, "AMX-BF16"
    elif compute == "bfloat16" and "avx512_bf16" in flags:
        factor, why = 2, "VDPBF16PS: 2 bf16 MACs per fp32 lane"
    elif compute == "float16" and "avx512_fp16" in flags:
        factor, why = 2, "AVX512-FP16: 32 fp16 lanes"
    elif compute == "int8" and "amx_int8" in flags:
        factor, why = 64, "AMX-INT8"
    elif compute == "int8" and flags & {"avx512_vnni", "avx_vnni"}:
        factor, why = 4, "VNNI VPDPBUSD: 4 u8xs8 MACs per 32-bit lane"
    elif compute == "int8":
        factor, why = 2, "PMADDUBSW: 2 MACs per 16-bit lane"
    cores = threads or default_threads()
    hz = clock_hz()
    macs = cores * hz * base * factor
    return macs, (f"{cores} cores x {hz / 1e9:.2f} GHz x {base * factor} MACs/cycle ({how}; {why})")


def over_peak(batch: int, share: float) -> str:
    """The warning for a rate above the computed peak (its share is not shown)."""
    return (
        f"batch {batch}: {share:.0%} of the computed peak, so the peak is wrong for this CPU "
        f"(clock {clock_source()}); share of peak not shown (set QUENCH_CPU_CLOCK_GHZ)"
    )


def compute_of(manifest: dict[str, Any]) -> str:
    """The arithmetic that dominates an artifact: int8, bfloat16, float16 or float32."""
    return PrecisionInfo.from_dict(manifest["precision"]).compute


def measure(
    infer: Callable[[np.ndarray], Any] | list[Callable[[np.ndarray], Any]],
    input_shape: tuple[int, ...],
    batch: int,
    iterations: int | None = None,
    duration: float | None = None,
    warmup: int = 20,
    on_step: Callable[[], None] | None = None,
    x: np.ndarray | None = None,
) -> tuple[int, float, np.ndarray]:
    """Run ``infer`` on one batch (``x``, or random); returns (iterations, seconds, latencies
    in s).

    A list of functions keeps that many requests in flight (one thread each, see
    ``_measure_concurrent``).
    """
    if x is None:
        x = random_batch(input_shape, batch)
    if iterations is None and duration is None:
        duration = 10.0
    if isinstance(infer, list):
        return _measure_concurrent(infer, x, iterations, duration, warmup, on_step)
    for _ in range(warmup):
        infer(x)
    lat: list[float] = []
    start = time.perf_counter()
    deadline = start + duration if duration is not None else float("inf")
    while True:
        t = time.perf_counter()
        infer(x)
        now = time.perf_counter()
        lat.append(now - t)
        if on_step:
            on_step()
        if (iterations is not None and len(lat) >= iterations) or now >= deadline:
            break
    return len(lat), time.perf_counter() - start, np.asarray(lat)


def _measure_concurrent(
    infers: list[Callable[[np.ndarray], Any]],
    x: np.ndarray,
    iterations: int | None,
    duration: float | None,
    warmup: int,
    on_step: Callable[[], None] | None,
) -> tuple[int, float, np.ndarray]:
    """``len(infers)`` threads each run ``x`` back to back from the same start; ``iterations``
    counts the requests of all threads; latencies are per request, under that load."""
    lock = threading.Lock()
    lat: list[float] = []
    errors: list[BaseException] = []
    ready = threading.Barrier(len(infers) + 1)
    box: dict[str, float] = {}

    def work(infer: Callable[[np.ndarray], Any]) -> None:
        try:
            for _ in range(max(1, warmup // len(infers))):
                infer(x)
        except BaseException as exc:
            errors.append(exc)
        ready.wait()
        ready.wait()  # start together
        while not errors:
            t = time.perf_counter()
            try:
                infer(x)
            except BaseException as exc:
                errors.append(exc)
                return
            now = time.perf_counter()
            with lock:
                if (iterations is not None and len(lat) >= iterations) or now >= box["deadline"]:
                    return
                lat.append(now - t)
                if on_step:
                    on_step()

    threads = [threading.Thread(target=work, args=(f,), daemon=True) for f in infers]
    for t in threads:
        t.start()
    ready.wait()  # every thread warmed up
    start = time.perf_counter()
    box["deadline"] = start + duration if duration is not None else float("inf")
    ready.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return len(lat), time.perf_counter() - start, np.asarray(lat)


def random_batch(input_shape: tuple[int, ...], batch: int, dtype: str = "float32") -> np.ndarray:
    """A random batch: standard normal floats, or for ``uint8`` random pixels."""
    rng = np.random.default_rng(0)
    if np.dtype(dtype) == np.uint8:
        return rng.integers(0, 256, (batch, *input_shape), dtype=np.uint8)
    return rng.standard_normal((batch, *input_shape)).astype(dtype)


def percentile_key(p: float) -> str:
    """``p50``, ``p99.9``: the latency figure's name."""
    return f"p{p:g}"


def summarize(
    lat: np.ndarray,
    iterations: int,
    seconds: float,
    batch: int,
    percentiles: tuple[float, ...] = PERCENTILES,
) -> tuple[float, dict[str, float]]:
    ms = lat * 1e3
    wanted = sorted({*PERCENTILES, *percentiles})
    pct = {percentile_key(p): float(np.percentile(ms, p)) for p in wanted}
    stats = {**pct, "mean": float(ms.mean()), "min": float(ms.min()), "max": float(ms.max())}
    return batch * iterations / seconds, {k: round(v, 3) for k, v in stats.items()}


def perf_model(
    model: Any,
    batches: list[int],
    iterations: int | None = None,
    duration: float | None = None,
    warmup: int = 20,
    progress: bool = True,
    requests: int = 1,
    rounds: int = ROUNDS,
    percentiles: tuple[float, ...] = PERCENTILES,
    inputs: np.ndarray | None = None,
    streams: int | None = None,
) -> list[PerfResult]:
    """Measure a loaded ``quench.Model`` at each batch size, with ``requests`` in flight, in
    ``rounds`` rounds that alternate between the batch sizes. ``inputs``: preprocessed images
    to time instead of random data (batches cycle through them); ``streams``: the engine's
    parallel streams (OpenVINO), with as many requests in flight unless ``requests`` says."""
    if model.fixed_batch and any(b != model.fixed_batch for b in batches):
        raise QuenchError(
            f"{model.path}: built with fixed batch {model.fixed_batch}; measure --batch "
            f"{model.fixed_batch} or rebuild with --dynamic-batch"
        )
    compute = model.spec.precision.compute
    runner = model.runner
    if streams is not None and requests == 1:
        requests = streams  # benchmark_app: one request per stream unless told otherwise
    if requests > 1 or streams is not None:
        try:
            fns = runner.concurrent(requests, streams)
        except NotImplementedError as exc:
            raise QuenchError(str(exc)) from None
        infer: Any = [lambda x, f=f: f({model.input_name: x}) for f in fns]
    else:
        infer = lambda x: runner.infer({model.input_name: x})  # noqa: E731
    return _sweep(
        infer,
        model.data.input_shape,
        batches,
        Timing(iterations, duration, warmup, rounds, percentiles, inputs, model.data.input_dtype),
        progress,
        macs=model.spec.macs_per_image,
        compute=compute,
        threads=getattr(runner, "threads", None) or default_threads(),
        model=model.name,
        precision=model.precision,
        engine=model.engine,
        streams=streams,
        inputs="random" if inputs is None else f"{len(inputs)} images",
    )


def load_inputs(model: Any, paths: list[Path]) -> np.ndarray:
    """Real images through the model's preprocessing, as one array of its input (float32, or
    uint8 pixels for a ``--input uint8`` artifact) (--input-images).
    An unreadable file is an error naming it: a timing must say what it ran on."""
    if not paths:
        raise QuenchError("--input-images: no images")
    norm = Normalizer(model.data)
    return norm.batch([load_pixels(p, model.data) for p in paths])


def startup(model: Any, batch: int, inputs: np.ndarray | None = None) -> dict[str, Any]:
    """benchmark_app's compile and first-inference times, in ms: the engine compiling the
    artifact's payload (session or compiled model), then one inference at ``batch``."""
    out: dict[str, Any] = {}
    if getattr(model, "_runner", None) is None:
        t = time.perf_counter()
        model.runner  # noqa: B018 - compiles
        out["compile_ms"] = round((time.perf_counter() - t) * 1e3, 3)
    else:
        out["compile_ms"] = None
        out["note"] = "compiled during loading (the artifact's self-check ran)"
    shape, dtype = model.data.input_shape, model.data.input_dtype
    x = (
        random_batch(shape, batch, dtype)
        if inputs is None
        else inputs[np.arange(batch) % len(inputs)]
    )
    t = time.perf_counter()
    model.run_batch(np.ascontiguousarray(x))
    out["first_inference_ms"] = round((time.perf_counter() - t) * 1e3, 3)
    return out


@dataclass
class Timing:
    """How long and how often to measure each configuration."""

    iterations: int | None = None  # per configuration, over all rounds
    duration: float | None = None  # seconds per configuration, over all rounds (default 10)
    warmup: int = 20
    rounds: int = ROUNDS
    percentiles: tuple[float, ...] = PERCENTILES
    inputs: np.ndarray | None = None  # real preprocessed images; None: random data
    dtype: str = "float32"  # of the random data: the engine input's (uint8: pixels)

    def batch_input(self, shape: tuple[int, ...], batch: int) -> np.ndarray:
        if self.inputs is None:
            return random_batch(shape, batch, self.dtype)
        idx = np.arange(batch) % len(self.inputs)
        return np.ascontiguousarray(self.inputs[idx])

    def plan(self) -> list[tuple[int | None, float | None]]:
        """(iterations, seconds) of each round."""
        if self.iterations is not None:
            return [(n, None) for n in split(self.iterations, self.rounds)]
        total = 10.0 if self.duration is None else self.duration
        n = max(1, self.rounds)
        return [(None, total / n)] * n


def _sweep(
    infer: Callable[[np.ndarray], Any] | list[Callable[[np.ndarray], Any]],
    shape: tuple[int, ...],
    batches: list[int],
    timing: Timing,
    progress: bool,
    *,
    macs: int | None,
    compute: str,
    threads: int,
    **fields: Any,
) -> list[PerfResult]:
    """Measure ``infer`` at each batch size in rounds that alternate between the sizes (so a
    slow spell of the machine hits every size alike); one ``PerfResult`` per size. A list of
    functions keeps that many requests in flight."""
    peak, _ = peak_macs(compute, threads)
    plan = timing.plan()
    xs = {b: timing.batch_input(shape, b) for b in batches}
    per: dict[int, list[tuple[int, float, np.ndarray]]] = {b: [] for b in batches}
    total = timing.iterations * len(batches) if timing.iterations else None
    with watch_load() as load, Bar("perf", total, enabled=progress) as bar:
        for r, (n_round, secs_round) in enumerate(plan):
            for b in batches:
                # the full warm-up before a size's first round; one call after switching sizes
                warm = timing.warmup if r == 0 else min(1, timing.warmup)
                per[b].append(
                    measure(
                        infer, shape, b, n_round, secs_round, warm, on_step=bar.advance, x=xs[b]
                    )
                )
    results = []
    for b in batches:
        n = sum(m[0] for m in per[b])
        secs = sum(m[1] for m in per[b])
        lat = np.concatenate([m[2] for m in per[b]])
        qps, stats = summarize(lat, n, secs, b, timing.percentiles)
        rounds = [{"qps": round(b * m[0] / m[1], 2), "seconds": round(m[1], 4)} for m in per[b]]
        s = spread([r["qps"] for r in rounds])
        warnings = [w for w in [instability(f"batch {b} throughput", s)] if w]
        share = macs * qps / peak if macs else None
        if share is not None and share > 1:  # never shown: the peak (clock, MACs/cycle) is wrong
            warnings.append(over_peak(b, share))
            share = None
        results.append(
            PerfResult(
                batch=b,
                threads=threads,
                iterations=n,
                seconds=round(secs, 6),
                qps=round(qps, 2),
                latency_ms=stats,
                compute=compute,
                macs_per_image=macs,
                peak_share=None if share is None else round(share, 4),
                requests=len(infer) if isinstance(infer, list) else 1,
                rounds=rounds,
                qps_spread=s.to_dict(),
                **fields,
            )
        )
        results[-1].warnings = warnings
    for r in results:
        r.machine_load = load.to_dict()
        r.warnings += load.warnings
    return results


def perf_onnx(
    path: str | Path,
    batches: list[int] | None,
    iterations: int | None = None,
    duration: float | None = None,
    warmup: int = 20,
    threads: int | None = None,
    progress: bool = True,
    requests: int = 1,
    rounds: int = ROUNDS,
    percentiles: tuple[float, ...] = PERCENTILES,
    startup_times: dict[str, Any] | None = None,
) -> list[PerfResult]:
    """Baseline: the raw ONNX file on plain ONNX Runtime (default session options); with
    ``requests`` > 1, that many ``run`` calls at once from as many threads. ``startup_times``
    gets the load, compile (session) and first-inference times in ms; ``batches`` None: the
    batch the input declares, or 1, 4 and 8 when it is symbolic."""
    t0 = time.perf_counter()
    src = load_model(path)
    t1 = time.perf_counter()
    # plain: a batch the model does not take fails, as it does in ONNX Runtime (errors
    # logged only: an IR-3 model would warn once per weight listed among its inputs)
    sess = session(str(path), threads=threads, log_severity=3, any_batch=False)
    t2 = time.perf_counter()
    inp = sess.get_inputs()[0]
    if batches is None:
        batches = [inp.shape[0]] if isinstance(inp.shape[0], int) else [1, 4, 8]
    shape = tuple(int(d) if isinstance(d, int) else 0 for d in inp.shape[1:])
    sess.run(None, {inp.name: random_batch(shape, batches[0])})
    if startup_times is not None:
        startup_times["load_ms"] = round((t1 - t0) * 1e3, 3)
        startup_times["compile_ms"] = round((t2 - t1) * 1e3, 3)
        startup_times["first_inference_ms"] = round((time.perf_counter() - t2) * 1e3, 3)
    macs = count_macs(src.model, shape)
    quantized = any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in src.model.graph.node)

    def run(x: np.ndarray) -> Any:
        return sess.run(None, {inp.name: x})

    return _sweep(
        [run] * requests if requests > 1 else run,
        shape,
        batches,
        Timing(iterations, duration, warmup, rounds, percentiles),
        progress,
        macs=macs,
        compute="int8" if quantized else "float32",
        threads=threads or default_threads(),
        model=Path(path).stem,
        precision="onnx (source)",
        engine=f"onnxruntime {ort.__version__} (default options)",
    )


def perf_images(
    model: Any, images: list[Path], batch: int, naive: bool = True, progress: bool = True
) -> dict[str, Any]:
    """End-to-end images/s on real files: the overlapped pipeline, and a naive loop that decodes
    a batch, then infers it, with nothing overlapped (for comparison)."""
    out: dict[str, Any] = {"batch": batch, "images": len(images)}
    with Bar(f"end-to-end batch {batch}", len(images), enabled=progress) as bar:
        t = time.perf_counter()
        failed = sum(
            not p.ok
            for p in model.iter_classify(
                images, topk=5, batch_size=batch, on_done=lambda p: bar.advance()
            )
        )
        secs = time.perf_counter() - t
    out["pipeline"] = {
        "seconds": round(secs, 3),
        "images_per_s": round(len(images) / secs, 2),
        "failed": failed,
    }
    if naive:
        norm = Normalizer(model.data)
        t = time.perf_counter()
        for i in range(0, len(images), batch):
            pixels = []
            for path in images[i : i + batch]:
                with contextlib.suppress(ImageError):  # the pipeline reports bad files
                    pixels.append(load_pixels(path, model.data))
            if pixels:
                model.scores(model.run_batch(norm.batch(pixels)))
        secs = time.perf_counter() - t
        out["naive_loop"] = {
            "seconds": round(secs, 3),
            "images_per_s": round(len(images) / secs, 2),
        }
    return out
