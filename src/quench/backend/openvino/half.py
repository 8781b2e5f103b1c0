"""``force_float16`` is never a trap: fp16 compute is kept only where it is measured faster
than fp32 on this CPU.

On some CPUs with fp16 arithmetic (AVX512-FP16 without AMX-FP16: Sapphire Rapids) OpenVINO's
fp16 kernels run at about 0.7x of fp32. At build time both inference precisions of the same
IR (fp16 weights) are timed in interleaved rounds at the batch sizes the artifact serves;
fp16 compute stays only when it is faster beyond the noise of the rounds
(``quench.stats.compare``, paired). Otherwise the artifact stores fp16 and computes fp32, the
fastest precision at least as accurate as fp16 (bf16 has fewer mantissa bits), and the build
says so in one line. ``--fp16-compute`` keeps fp16 compute regardless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from quench.backend.base import CompileSpec
from quench.stats import RULE, compare, geomean

# the two computes timed, as OpenVINO's INFERENCE_PRECISION_HINT values
HINTS = {"f16": "f16", "f32": "f32"}
ROUNDS = 6
ROUND_SECONDS = 0.15  # per precision, batch size and round

# (hint, batch) -> images/s of one timing; replaced in tests
Timer = Callable[[str, int], float]


@dataclass(frozen=True)
class Decision:
    """Whether fp16 compute pays here, with the rounds that decided it (for the manifest)."""

    keep_fp16: bool
    ratio: float  # fp16 / fp32 throughput, geometric mean over the batch sizes and rounds
    record: dict[str, Any]

    def line(self) -> str:
        """The build's one line about it."""
        if self.keep_fp16:
            return f"float16 compute measured {self.ratio:.2f}x float32 here: kept"
        return (
            f"float16 compute measured {self.ratio:.2f}x float32 on this CPU (not faster beyond "
            "the noise): the artifact stores float16 and computes float32, as fast and more "
            "accurate; --fp16-compute keeps float16 compute"
        )


def decide(rounds: dict[str, list[float]], batches: list[int]) -> Decision:
    """``rounds``: per hint (``f16``, ``f32``), each round's geometric-mean images/s."""
    c = compare(rounds["f16"], rounds["f32"], paired=True)
    ratio = float(np.exp(np.mean(np.log(rounds["f16"])) - np.mean(np.log(rounds["f32"]))))
    record = {
        "batches": batches,
        "rounds_images_per_s": {k: [round(v, 2) for v in vs] for k, vs in rounds.items()},
        "fp16_vs_fp32": round(ratio, 4),
        "rule": f"fp16 compute kept only when faster beyond the noise ({RULE})",
    }
    keep = c.winner == "a"
    record["computes"] = "float16" if keep else "float32"
    return Decision(keep, ratio, record)


def measure(
    xml: bytes,
    weights: bytes,
    config: dict[str, str],
    spec: CompileSpec,
    shape: tuple[int, ...],
    timer: Timer | None = None,
) -> Decision:
    """Time ``f16`` against ``f32`` inference precision of one IR in interleaved rounds."""
    from quench.backend.openvino.runner import OpenVinoRunner
    from quench.perf import measure as time_it
    from quench.perf import random_batch

    batches = [spec.batch] if spec.batch else [1, 8]
    hints = ("f16", "f32")
    runners: dict[str, Any] = {}
    if timer is None:
        inputs = {b: random_batch(shape, b, spec.input_dtype) for b in batches}
        for h in hints:
            hint = {**config, "INFERENCE_PRECISION_HINT": HINTS[h]}
            runners[h] = OpenVinoRunner(xml, weights, hint, threads=spec.threads).activate()

        def timer(h: str, b: int) -> float:
            run = runners[h]
            n, secs, _ = time_it(
                lambda x: run.infer({spec.input_name: x}),
                shape,
                b,
                duration=ROUND_SECONDS,
                warmup=2,
                x=inputs[b],
            )
            return b * n / secs

    rounds: dict[str, list[float]] = {h: [] for h in hints}
    try:
        for r in range(ROUNDS):
            for h in hints if r % 2 == 0 else hints[::-1]:
                rounds[h].append(geomean([timer(h, b) for b in batches]))
    finally:
        for run in runners.values():
            run.deactivate()
    return decide(rounds, batches)
