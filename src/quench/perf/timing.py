"""The timing loop: one configuration back to back (or with requests in flight), and the sweep
over batch sizes in alternating rounds that makes ``PerfResult`` rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from quench.perf.peak import over_peak, peak_macs
from quench.perf.results import PERCENTILES, PerfResult, percentile_key
from quench.progress import Bar
from quench.stats import instability, split, spread, watch_load

ROUNDS = 5  # rounds per figure by default, alternating between the configurations


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


def sweep(
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
