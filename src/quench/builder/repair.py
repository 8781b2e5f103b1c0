"""Accuracy repair: keep the fewest, most sensitive layers in float until the bound holds.

1. *Rank* the quantized layers by sensitivity on the calibration images only
   (:mod:`quench.builder.sensitivity`: how much closer the logits come to fp32 with that one
   layer in float).
2. *Search* the number ``k`` of top-ranked layers kept in float: 1, 2, 4, ... until a mix passes
   the bound (galloping), then bisection between the last failing and the first passing ``k``.
   Each step asks a :data:`Judge`, which builds the mix as a what-if and measures the bound on the
   images the bound names (the check images, or the held-out calibration images).
3. The builder then quantizes again with those layers excluded, compiles, and confirms the bound
   with its own gates; every step and figure is kept for the manifest.

If even every ranked layer in float misses the bound, the plan says so with the best mix found.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quench.errors import ImageError, QuenchError
from quench.evaluate import GroundTruth
from quench.imaging import Normalizer, load_pixels
from quench.presets import DataConfig
from quench.progress import Bar


@dataclass(frozen=True)
class Verdict:
    """One mix judged: its figures, whether the bound holds, and a score (higher is better)."""

    figures: dict[str, Any]
    passed: bool
    score: float


Judge = Callable[[Sequence[str]], Verdict]


@dataclass
class Step:
    float_layers: int  # how many of the ranked layers were in float
    verdict: Verdict
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_layers": self.float_layers,
            **self.verdict.figures,
            "passed": self.verdict.passed,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class Plan:
    ranking: list[str]
    steps: list[Step] = field(default_factory=list)
    chosen: int | None = None  # k of the passing mix; None: no mix passed

    @property
    def float_layers(self) -> list[str] | None:
        return None if self.chosen is None else self.ranking[: self.chosen]

    @property
    def best(self) -> Step | None:
        """The passing step with the fewest float layers, else the best-scoring one."""
        passed = [s for s in self.steps if s.verdict.passed]
        if passed:
            return min(passed, key=lambda s: s.float_layers)
        return max(self.steps, key=lambda s: (s.verdict.score, -s.float_layers), default=None)


def search(ranking: Sequence[str], judge: Judge, say: Callable[[str], None] | None = None) -> Plan:
    """The smallest ``k`` such that the top ``k`` of ``ranking`` in float pass ``judge``.

    Assumes (as the search must) that more float layers do not make things worse; the result is
    always a mix that was judged, never an extrapolation. ``k = 0`` is taken as failing (the
    all-INT8 build that asked for the repair)."""
    plan = Plan(list(ranking))
    n = len(ranking)
    seen: dict[int, Step] = {}

    def ask(k: int) -> bool:
        if k not in seen:
            t = time.perf_counter()
            verdict = judge(ranking[:k])
            seen[k] = Step(k, verdict, time.perf_counter() - t)
            plan.steps.append(seen[k])
            if say:
                figures = ", ".join(f"{a} {b}" for a, b in verdict.figures.items())
                say(
                    f"  {k} layer(s) in float: {figures} -> "
                    + ("passes" if verdict.passed else "misses the bound")
                )
        return seen[k].verdict.passed

    if n == 0:
        return plan
    lo, hi = 0, None  # lo fails; hi passes
    k = 1
    while k < n:
        if ask(k):
            hi = k
            break
        lo, k = k, k * 2
    if hi is None:
        if not ask(n):
            return plan
        hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ask(mid):
            hi = mid
        else:
            lo = mid
    plan.chosen = hi
    return plan


@dataclass
class CheckSet:
    """Check images read once: the built model's input, fp32's top-1, and the labels (None:
    the measure is agreement with fp32's top-1, as in the build's accuracy check)."""

    x: np.ndarray
    reference: np.ndarray  # fp32's top-1 class of each image
    labels: np.ndarray | None = None  # class index per image, -1 where the truth has none

    def drop(self, logits: np.ndarray) -> float:
        """Top-1 drop against fp32, in percentage points."""
        got, ref = logits.argmax(1), self.reference
        if self.labels is None:
            return float(100 * (1 - np.mean(got == ref)))
        known = self.labels >= 0
        if not known.any():
            raise QuenchError("no check image has a label")
        truth = self.labels[known]
        return float(100 * (np.mean(ref[known] == truth) - np.mean(got[known] == truth)))


def read_check_images(
    paths: Sequence[Path], data: DataConfig, truth: GroundTruth | None, progress: bool = True
) -> tuple[np.ndarray, np.ndarray | None, list[Path]]:
    """The readable images of ``paths`` preprocessed as ``data`` says (uint8 pixels when
    ``data.input`` is uint8), their labels from ``truth`` (-1 where it has none), and their
    paths; unreadable files are left out, as the accuracy check leaves them out."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    kept: list[Path] = []
    with Bar("reading check images", len(paths), enabled=progress) as bar:
        for p in paths:
            try:
                images.append(load_pixels(p, data))
            except ImageError:
                continue
            finally:
                bar.advance()
            kept.append(p)
            if truth is not None:
                label = truth.get(p)
                labels.append(-1 if label is None else label)
    if not images:
        raise QuenchError("none of the check images could be read")
    x = Normalizer(data).batch(images)
    return x, (np.array(labels) if truth is not None else None), kept
