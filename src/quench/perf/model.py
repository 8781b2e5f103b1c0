"""Timing a loaded ``quench.Model``: engine-only throughput per batch size, its startup times,
and end-to-end images/s on real files."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from quench.errors import ImageError, QuenchError
from quench.hw import default_threads
from quench.imaging import Normalizer, load_pixels
from quench.perf.results import PERCENTILES, PerfResult
from quench.perf.timing import ROUNDS, Timing, random_batch, sweep
from quench.progress import Bar


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
    return sweep(
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
