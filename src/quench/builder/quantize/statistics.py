"""Activation statistics and range methods: one fp32 pass over the calibration images, then a
clipping range per activation tensor.

The pass runs the model once with every float activation exposed as an output. Per tensor it
records the exact min/max and, for the histogram methods, a histogram; for the input of every
Conv/Gemm it records the per-channel mean (for bias correction). The range of each tensor comes
from ``QuantConfig.method``: ``minmax``; ``percentile`` (the default: cut ``(100 - percentile) /
2`` % of the values at each end); ``entropy`` (KL divergence between the clipped and the 8-bit
histogram, TensorRT style); ``mse`` (the clipping range minimising the expected squared error of
the 8-bit grid). A range is never wider than what was observed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from quench.builder.quantize.config import QuantConfig
from quench.errors import QuenchError

_BINS = 2048  # histogram resolution (between _BINS and 2 * _BINS bins over the observed range)
_SAMPLE = 1 << 18  # at most this many values of a tensor per batch go into its histogram
_BATCH_BYTES = 384 << 20  # activation memory per calibration batch
_MAX_BATCH = 32

Progress = Callable[[int, int], None]
Ranges = dict[str, tuple[float, float]]
Means = dict[str, dict[str, Any]]  # tensor -> {"mean": [per channel], "shape": [C, H, W]}


# --------------------------------------------------------------------------------------------
# what to measure, and in which batches


def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float tensor computed by the graph (and the float graph input), in graph order."""
    types = _elem_types(model)
    inits = {t.name for t in model.graph.initializer}
    out: list[str] = []
    seen: set[str] = set()
    cands = [i.name for i in model.graph.input] + [o for n in model.graph.node for o in n.output]
    for name in cands:
        if name and name not in inits and name not in seen and types.get(name) == TensorProto.FLOAT:
            out.append(name)
            seen.add(name)
    return out


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def batch_size(model: onnx.ModelProto, input_name: str, calib: np.ndarray) -> int:
    """Images per calibration batch so that all exposed activations fit in ~_BATCH_BYTES."""
    per_image = _activation_elems_per_image(model, input_name, calib)
    if per_image <= 0:
        return 8
    return int(max(1, min(_MAX_BATCH, _BATCH_BYTES // (4 * per_image))))


def _activation_elems_per_image(model: onnx.ModelProto, input_name: str, calib: np.ndarray) -> int:
    try:
        m = onnx.ModelProto.FromString(model.SerializeToString())
        inp = next(i for i in m.graph.input if i.name == input_name)
        dims = inp.type.tensor_type.shape.dim
        if len(dims) != calib.ndim:
            return 0
        for d, v in zip(dims, (1, *calib.shape[1:]), strict=True):
            d.Clear()
            d.dim_value = v
        g = onnx.shape_inference.infer_shapes(m).graph
    except Exception:
        return 0
    total = 0
    for v in g.value_info:
        dims = v.type.tensor_type.shape.dim
        if v.type.tensor_type.elem_type == TensorProto.FLOAT and all(
            d.HasField("dim_value") for d in dims
        ):
            total += int(np.prod([d.dim_value for d in dims], dtype=np.int64))
    return total


class Ticker:
    """Calls ``progress(done, total)`` once per calibration batch."""

    def __init__(self, progress: Progress | None, total: int = 0) -> None:
        self.progress = progress
        self.done = 0
        self.total = total

    def __call__(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))


# --------------------------------------------------------------------------------------------
# the calibration pass


class _Hist:
    """Histogram with a fixed bin width that grows (exactly: merging bin pairs) with the range."""

    __slots__ = ("counts", "origin", "width", "zeros")

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None
        self.origin = 0.0
        self.width = 0.0
        self.zeros = 0

    def add(self, sample: np.ndarray, lo: float, hi: float) -> None:
        if self.counts is None:
            span = hi - lo
            self.width = span / _BINS if span > 0 else max(abs(lo), 1e-12) / _BINS
            self.origin = lo
            self.counts = np.zeros(_BINS, dtype=np.int64)
        self._fit(lo, hi)
        n = len(self.counts)
        idx = np.floor((sample.astype(np.float64) - self.origin) / self.width)
        idx = np.clip(idx, 0, n - 1).astype(np.int64)
        self.counts += np.bincount(idx, minlength=n)
        self.zeros += int(np.count_nonzero(sample == 0))

    def _fit(self, lo: float, hi: float) -> None:
        assert self.counts is not None
        while True:
            n = len(self.counts)
            left = max(0, math.ceil((self.origin - lo) / self.width))
            right = max(0, math.floor((hi - self.origin) / self.width) + 1 - n)
            if n + left + right <= 2 * _BINS:
                break
            if n % 2:
                self.counts = np.append(self.counts, 0)
            self.counts = self.counts.reshape(-1, 2).sum(axis=1)
            self.width *= 2.0
        if left:
            self.counts = np.concatenate([np.zeros(left, dtype=np.int64), self.counts])
            self.origin -= left * self.width
        if right:
            self.counts = np.concatenate([self.counts, np.zeros(right, dtype=np.int64)])

    def centers(self) -> np.ndarray:
        assert self.counts is not None
        return self.origin + (np.arange(len(self.counts)) + 0.5) * self.width


@dataclass
class Stats:
    """What the calibration pass measured."""

    lo: dict[str, float]
    hi: dict[str, float]
    hist: dict[str, _Hist]
    means: Means
    images: int


def _sample(flat: np.ndarray) -> np.ndarray:
    if flat.size <= _SAMPLE:
        return flat
    stride = _odd_stride(flat.size // _SAMPLE + 1)
    return flat[::stride]


def _odd_stride(k: int) -> int:
    """Smallest prime >= max(k, 11): a stride that does not alias with 2^a * 7^b layouts."""
    k = max(k, 11)
    while any(k % p == 0 for p in range(2, int(k**0.5) + 1)):
        k += 1
    return k


def _session(model: onnx.ModelProto) -> Any:
    # heavy: imported when a calibration pass actually runs
    from quench.backend.onnxruntime.session import session

    return session(model)


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in m.graph.output}
    for name in names:
        if name not in present:
            m.graph.output.append(helper.make_empty_tensor_value_info(name))
            m.graph.output[-1].type.tensor_type.elem_type = TensorProto.FLOAT
    return m


def collect(
    model: onnx.ModelProto,
    input_name: str,
    calib: np.ndarray,
    tensors: list[str],
    method: str,
    mean_tensors: Sequence[str],
    batch: int,
    tick: Ticker,
) -> Stats:
    """One fp32 pass: exact min/max of every activation and, if needed, its histogram; the
    per-channel means of ``mean_tensors`` (the inputs of Conv/Gemm, for bias correction)."""
    names = [t for t in tensors if t != input_name]
    sess = _session(_with_outputs(model, names))
    want_hist = method != "minmax"
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    hist: dict[str, _Hist] = {t: _Hist() for t in tensors} if want_hist else {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for start in range(0, len(calib), batch):
        x = calib[start : start + batch]
        outs = dict(zip(names, sess.run(names, {input_name: x}), strict=True))
        outs[input_name] = x
        for t in tensors:
            a = outs[t]
            if a.size == 0:
                continue
            a_lo, a_hi = float(a.min()), float(a.max())
            if not (math.isfinite(a_lo) and math.isfinite(a_hi)):
                raise QuenchError(f"tensor {t!r} has NaN or infinite values on calibration data")
            lo[t] = min(lo.get(t, a_lo), a_lo)
            hi[t] = max(hi.get(t, a_hi), a_hi)
            if want_hist:
                hist[t].add(_sample(a.reshape(-1)), a_lo, a_hi)
        for t in mean_tensors:
            a = outs[t]
            axes = tuple(i for i in range(a.ndim) if i != 1)
            s = a.sum(axis=axes, dtype=np.float64)
            sums[t] = sums[t] + s if t in sums else s
            counts[t] = counts.get(t, 0) + a.size // max(a.shape[1], 1)
            shapes[t] = [int(d) for d in a.shape[1:]]
        del outs
        tick()
    means = {t: {"mean": (sums[t] / counts[t]).tolist(), "shape": shapes[t]} for t in mean_tensors}
    return Stats(lo=lo, hi=hi, hist=hist, means=means, images=len(calib))


# --------------------------------------------------------------------------------------------
# range methods


def ranges(stats: Stats, config: QuantConfig) -> Ranges:
    """The clipping range of every measured tensor by ``config.method``."""
    out: Ranges = {}
    for t in stats.lo:
        lo, hi = stats.lo[t], stats.hi[t]
        if config.method == "minmax" or hi <= lo:
            out[t] = (lo, hi)
            continue
        h = stats.hist[t]
        if config.method == "percentile":
            r = _percentile_range(h, config.percentile)
        elif config.method == "entropy":
            r = _entropy_range(h, lo, hi)
        else:
            r = _mse_range(h, lo, hi)
        out[t] = (max(lo, r[0]), min(hi, r[1]))  # never wider than observed
    return out


def _percentile_range(h: _Hist, p: float) -> tuple[float, float]:
    assert h.counts is not None
    cdf = np.cumsum(h.counts) / max(h.counts.sum(), 1)
    cut = (100.0 - p) / 200.0
    edges = h.origin + np.arange(len(h.counts) + 1) * h.width
    i_lo = int(np.searchsorted(cdf, cut, side="left"))
    i_hi = int(np.searchsorted(cdf, 1.0 - cut, side="left"))
    return float(edges[i_lo]), float(edges[min(i_hi + 1, len(edges) - 1)])


def _grid_error(
    h: _Hist, lo: float, hi: float, cand_lo: np.ndarray, cand_hi: np.ndarray
) -> np.ndarray:
    """Expected squared error of 8-bit asymmetric quantization for each (lo, hi) candidate."""
    assert h.counts is not None
    c = h.centers()
    n = h.counts.astype(np.float64)
    s0 = np.concatenate([[0.0], np.cumsum(n)])
    s1 = np.concatenate([[0.0], np.cumsum(n * c)])
    s2 = np.concatenate([[0.0], np.cumsum(n * c * c)])
    total = s0[-1]
    rmin = np.minimum(cand_lo, 0.0)
    rmax = np.maximum(cand_hi, 0.0)
    scale = np.maximum((rmax - rmin) / 255.0, 1e-30)
    zp = np.clip(np.round(-rmin / scale), 0, 255)
    q_lo = -zp * scale
    q_hi = (255 - zp) * scale
    k_lo = np.searchsorted(c, q_lo, side="left")  # bins below the grid
    k_hi = np.searchsorted(c, q_hi, side="right")  # bins at or below the top
    err_lo = s2[k_lo] - 2 * q_lo * s1[k_lo] + q_lo**2 * s0[k_lo]
    up2, up1, up0 = s2[-1] - s2[k_hi], s1[-1] - s1[k_hi], total - s0[k_hi]
    err_hi = up2 - 2 * q_hi * up1 + q_hi**2 * up0
    inside = np.maximum(s0[k_hi] - s0[k_lo] - h.zeros, 0.0)  # exact zeros round without error
    return err_lo + err_hi + inside * scale**2 / 12.0


def _candidates(lo: float, hi: float, steps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    fr = np.linspace(0.05, 1.0, steps)
    los = np.array([lo]) if lo >= 0 else lo * fr
    his = np.array([hi]) if hi <= 0 else hi * fr
    g_lo, g_hi = np.meshgrid(los, his, indexing="ij")
    return g_lo.ravel(), g_hi.ravel()


def _mse_range(h: _Hist, lo: float, hi: float) -> tuple[float, float]:
    cl, ch = _candidates(lo, hi)
    err = _grid_error(h, lo, hi, cl, ch)
    i = int(np.argmin(err))  # first minimum: the widest range among ties
    return float(cl[i]), float(ch[i])


def _entropy_range(h: _Hist, lo: float, hi: float) -> tuple[float, float]:
    """Clipping range minimising KL(P || Q), TensorRT style.

    P is the histogram inside the candidate range with the clipped mass added to its edge bins;
    Q is the in-range histogram (without the clipped mass) spread evenly over 255 levels.
    """
    assert h.counts is not None
    c = h.centers()
    n = h.counts.astype(np.float64)
    if h.zeros and h.origin <= 0 < h.origin + len(n) * h.width:
        # exact zeros (Relu/Clip outputs, padding) are represented exactly: leave them out
        z = min(int((0 - h.origin) // h.width), len(n) - 1)
        n[z] = max(n[z] - h.zeros, 0.0)
    best, best_kl = (lo, hi), math.inf
    cl, ch = _candidates(lo, hi, steps=40)
    for a, b in zip(cl, ch, strict=True):
        inside = (c >= a) & (c <= b)
        if inside.sum() < 2:
            continue
        raw = n[inside]
        p = raw.copy()
        p[0] += n[c < a].sum()
        p[-1] += n[c > b].sum()
        levels = np.minimum(((c[inside] - a) / (b - a) * 255).astype(np.int64), 254)
        nz = raw > 0
        tot = np.bincount(levels, weights=raw, minlength=255)
        cnt = np.bincount(levels, weights=nz.astype(np.float64), minlength=255)
        q = np.where(nz, tot[levels] / np.maximum(cnt[levels], 1.0), 0.0)
        pn = p / p.sum()
        qn = q / max(q.sum(), 1e-300)
        qn = np.maximum(qn, 1e-8)  # smoothing: clipped mass where Q has none
        m = pn > 0
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
        if kl < best_kl - 1e-12:
            best, best_kl = (float(a), float(b)), kl
    return best
