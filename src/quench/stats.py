"""Repeated-round statistics shared by ``perf``, the build's engine choice, the report and the
benchmark: the spread of a figure over rounds, whether the machine was busy meanwhile, and
whether one figure beats another by more than the measured noise.

The rule for a difference (``compare``): throughputs are compared as log ratios; a difference
counts only when the 95% confidence interval of the ratio (Student's t over the rounds; paired
round by round when the rounds were interleaved) excludes 1. Otherwise the two are a tie.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import psutil
from scipy import stats as sps

CV_BOUND = 0.05  # a figure whose rounds vary more than this (std / mean) is unstable
OTHER_WORK_BOUND = 0.25  # cores busy with other programs during a run that make it unstable
CONFIDENCE = 0.95
MIN_ROUNDS = 3  # fewer rounds than this cannot call a difference
RULE = (
    f"a difference counts when the {CONFIDENCE:.0%} confidence interval of the throughput "
    f"ratio over the rounds excludes 1 (at least {MIN_ROUNDS} rounds each); else it is a tie"
)


@dataclass(frozen=True)
class Spread:
    """A figure measured in several rounds."""

    n: int
    min: float
    median: float
    mean: float
    max: float
    cv: float  # sample standard deviation / mean; 0 for one round

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @property
    def unstable(self) -> bool:
        return self.cv > CV_BOUND


def spread(values: Sequence[float]) -> Spread:
    """min / median / mean / max and coefficient of variation of ``values`` (at least one)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("no values")
    mean = float(a.mean())
    cv = float(a.std(ddof=1) / mean) if a.size > 1 and mean else 0.0
    return Spread(int(a.size), float(a.min()), float(np.median(a)), mean, float(a.max()), cv)


def split(total: int, parts: int) -> list[int]:
    """``total`` iterations as ``parts`` round sizes that differ by at most one."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# -- the machine ------------------------------------------------------------------------------


# CPU time fields that are not work (guest time is already counted in user time on Linux)
_NOT_BUSY = frozenset({"idle", "iowait", "guest", "guest_nice"})


def _busy_seconds() -> tuple[float, float]:
    """(CPU seconds every program has used, CPU seconds this process has used)."""
    t = psutil.cpu_times()
    busy = sum(
        v for k, v in t._asdict().items() if k not in ("idle", "iowait", "guest", "guest_nice")
    )
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system


def load_average() -> float | None:
    """The 1-minute load average, where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


@dataclass
class MachineLoad:
    """How busy the machine was with other programs while something was measured."""

    cores: int
    seconds: float = 0.0
    other_cores: float = 0.0  # cores busy with other programs, on average
    load_before: float | None = None
    load_after: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return self.other_cores > OTHER_WORK_BOUND or (
            self.load_before is not None and self.load_before > self.cores
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "busy": self.busy}


@contextmanager
def watch_load(
    sample: Callable[[], tuple[float, float]] = _busy_seconds,
    clock: Callable[[], float] = time.monotonic,
    loadavg: Callable[[], float | None] = load_average,
    cores: int | None = None,
) -> Iterator[MachineLoad]:
    """Measure the CPU time other programs take while the block runs: all CPU time used on
    the machine minus this process's. ``sample``, ``clock`` and ``loadavg`` are injectable."""
    ml = MachineLoad(cores=cores or psutil.cpu_count() or 1, load_before=loadavg())
    busy0, own0 = sample()
    t0 = clock()
    try:
        yield ml
    finally:
        busy1, own1 = sample()
        ml.seconds = round(clock() - t0, 3)
        ml.load_after = loadavg()
        if ml.seconds > 0:
            ml.other_cores = round(max(0.0, (busy1 - busy0) - (own1 - own0)) / ml.seconds, 3)
        if ml.other_cores > OTHER_WORK_BOUND:
            ml.warnings.append(
                f"other programs kept {ml.other_cores:.2f} of {ml.cores} cores busy during the "
                "run: the figures are lower and noisier than on a quiet machine"
            )
        elif ml.load_before is not None and ml.load_before > ml.cores:
            ml.warnings.append(
                f"the load average was {ml.load_before:.2f} on {ml.cores} cores when the run "
                "started: other work was competing for the CPU"
            )


def other_work_now(seconds: float = 1.0) -> float:
    """Cores other programs keep busy right now, sampled over ``seconds`` of idling."""
    with watch_load() as ml:
        time.sleep(seconds)
    return ml.other_cores


def load_changed(stored: dict[str, Any] | None, now: float) -> str | None:
    """Why speed figures measured under ``stored`` (a ``MachineLoad.to_dict()``) no longer
    describe this machine, whose other programs now keep ``now`` cores busy; None if they do."""
    if not stored:
        return "the stored figures do not say how busy the machine was"
    if abs(now - stored["other_cores"]) > OTHER_WORK_BOUND:
        return f"other programs kept {stored['other_cores']:.2f} cores busy then and {now:.2f} now"
    return None


def instability(name: str, s: Spread) -> str | None:
    """A warning when a figure varied more than ``CV_BOUND`` between rounds."""
    if not s.unstable:
        return None
    return (
        f"{name}: varied {s.cv:.1%} between rounds ({s.min:.4g} to {s.max:.4g}; above the "
        f"{CV_BOUND:.0%} bound): unstable, repeat on a quiet machine"
    )


# -- comparisons ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Whether ``a`` is faster than ``b`` (throughputs: higher is better)."""

    winner: str  # "a", "b" or "tie"
    ratio: float  # a / b, the geometric mean over the rounds
    low: float  # the confidence interval of the ratio
    high: float
    rounds: int
    paired: bool

    @property
    def margin(self) -> float:
        """How much faster the winner is (0.07 = 7%); 0 for a tie."""
        if self.winner == "tie":
            return 0.0
        return self.ratio - 1 if self.winner == "a" else 1 / self.ratio - 1

    def text(self) -> str:
        how = f"{self.ratio:.3f}x (95% CI {self.low:.3f}-{self.high:.3f}, {self.rounds} rounds)"
        if self.winner == "tie":
            return f"tie: {how}"
        return f"{self.margin:.1%} faster: {how}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "winner": self.winner,
            "ratio": round(self.ratio, 4),
            "ci": [round(self.low, 4), round(self.high, 4)],
            "margin": round(self.margin, 4),
            "rounds": self.rounds,
            "paired": self.paired,
            "rule": RULE,
        }


def compare(a: Sequence[float], b: Sequence[float], paired: bool = False) -> Comparison:
    """Is throughput ``a`` higher than ``b`` beyond the noise of their rounds? ``paired``: the
    rounds were interleaved (round i of each measured back to back), so round-by-round ratios
    cancel slow drifts of the machine."""
    la, lb = np.log(np.asarray(a, float)), np.log(np.asarray(b, float))
    paired = paired and la.size == lb.size
    if paired:
        d = la - lb
        n = d.size
        diff = float(d.mean())
        se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
        df = n - 1
    else:
        n = min(la.size, lb.size)
        diff = float(la.mean() - lb.mean())
        va = la.var(ddof=1) / la.size if la.size > 1 else math.inf
        vb = lb.var(ddof=1) / lb.size if lb.size > 1 else math.inf
        se = float(math.sqrt(va + vb))
        # Welch-Satterthwaite degrees of freedom
        num, den = (va + vb) ** 2, 0.0
        if la.size > 1 and lb.size > 1:
            den = va**2 / (la.size - 1) + vb**2 / (lb.size - 1)
        df = num / den if den > 0 else max(1, la.size + lb.size - 2)
    if not math.isfinite(se) or n < MIN_ROUNDS:
        return Comparison("tie", math.exp(diff), 0.0, math.inf, n, paired)
    half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, df)) * se if se > 0 else 0.0
    low, high = math.exp(diff - half), math.exp(diff + half)
    winner = "a" if low > 1 else "b" if high < 1 else "tie"
    return Comparison(winner, math.exp(diff), low, high, n, paired)


def geomean(values: Sequence[float]) -> float:
    return float(np.exp(np.mean(np.log(np.asarray(values, float)))))
