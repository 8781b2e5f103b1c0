"""What ``quench perf`` measures, as data and as table cells: ``PerfResult``, the perf table's
columns and trtexec / benchmark_app style summary lines."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

PERCENTILES = (50, 90, 99)


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerfResult:
        """The inverse of ``to_dict`` (keys it does not know are dropped)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


def percentile_key(p: float) -> str:
    """``p50``, ``p99.9``: the latency figure's name."""
    return f"p{p:g}"
