"""Throughput and latency per batch size (like MagicMind's ``mm_run``), with share of peak.

The share of peak is ``MACs per image x images/s / peak MACs/s``; the peak is worked out from
the CPU's ISA flags, its core count and its core clock, measured (``quench.clock``; see
``peak_macs``). A share above 100% is never shown: it means the peak is wrong.

Modules: ``results`` (``PerfResult``, the table's cells), ``peak`` (the CPU's peak),
``timing`` (the timing loop and the sweep over batch sizes), ``model`` (a loaded artifact:
engine-only, startup, end to end) and ``source`` (the raw ONNX model on plain ONNX Runtime).
"""

from __future__ import annotations

from quench.perf.model import load_inputs, perf_images, perf_model, startup
from quench.perf.peak import compute_of, fp32_macs_per_cycle, over_peak, peak_macs
from quench.perf.results import (
    PERCENTILES,
    PERF_COLUMNS,
    PerfResult,
    latency_line,
    percentile_key,
    perf_row,
    startup_line,
)
from quench.perf.source import perf_onnx
from quench.perf.timing import ROUNDS, Timing, measure, random_batch, summarize, sweep

__all__ = [
    "PERCENTILES",
    "PERF_COLUMNS",
    "ROUNDS",
    "PerfResult",
    "Timing",
    "compute_of",
    "fp32_macs_per_cycle",
    "latency_line",
    "load_inputs",
    "measure",
    "over_peak",
    "peak_macs",
    "percentile_key",
    "perf_images",
    "perf_model",
    "perf_onnx",
    "perf_row",
    "random_batch",
    "startup",
    "startup_line",
    "summarize",
    "sweep",
]
