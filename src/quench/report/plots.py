"""The report's PNG plots (matplotlib figures drawn by Agg, without pyplot: the host process's
matplotlib backend is left as it was) and the sample images' thumbnails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quench.perf import PerfResult
from quench.report.compare import FP32
from quench.report.document import ReportDoc

THUMB = 128  # sample thumbnails: square tiles, the image fitted inside


def _figure(width: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4))
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def throughput_plot(by_prec: dict[str, list[PerfResult]], path: Path) -> Path:
    """qps against batch size per precision; the bars span the rounds' min to max (the noise)."""
    fig, ax = _figure(6.4)
    for prec, rs in by_prec.items():
        rs = sorted(rs, key=lambda r: r.batch)
        low = [r.qps - (r.qps_spread or {}).get("min", r.qps) for r in rs]
        high = [(r.qps_spread or {}).get("max", r.qps) - r.qps for r in rs]
        ax.errorbar(
            [r.batch for r in rs],
            [r.qps for r in rs],
            yerr=[[max(0.0, x) for x in low], [max(0.0, x) for x in high]],
            marker="o",
            capsize=3,
            label=prec,
        )
    ax.set_xticks(sorted({r.batch for rs in by_prec.values() for r in rs}))
    ax.set_xlabel("batch size")
    ax.set_ylabel("throughput (images/s)")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput vs batch size (bars: min-max of the rounds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def latency_plot(by_prec: dict[str, list[PerfResult]], path: Path) -> Path:
    """p50 / p90 / p99 latency per precision and batch size."""
    rows = [r for rs in by_prec.values() for r in sorted(rs, key=lambda r: r.batch)]
    fig, ax = _figure(max(6.4, 0.7 * len(rows) + 2))
    width = 0.27
    xs = range(len(rows))
    for i, p in enumerate(("p50", "p90", "p99")):
        ax.bar([x + (i - 1) * width for x in xs], [r.latency_ms[p] for r in rows], width, label=p)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r.precision}\nb{r.batch}" for r in rows], fontsize=7, rotation=30)
    ax.set_ylabel("latency per batch (ms)")
    ax.set_title("Latency p50 / p90 / p99")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def accuracy_plot(doc: ReportDoc, path: Path) -> Path:
    """Top-1 / top-5 change against fp32 in points (without fp32: the accuracy itself)."""
    acc = doc.accuracy
    base = next((a for a in acc if a.precision == FP32), None)
    fig, ax = _figure(max(6.4, 1.2 * len(acc) + 2))
    xs = range(len(acc))
    if base is not None:  # the change in points: a 0-1 axis would hide a 6-point drop
        for i, key in enumerate(("top1", "top5")):
            ax.bar(
                [x + (i - 0.5) * 0.4 for x in xs],
                [(getattr(a, key) - getattr(base, key)) * 100 for a in acc],
                0.4,
                label=key.replace("top", "top-"),
            )
        ax.axhline(0, color="black", linewidth=0.8)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, -1.0), max(hi, 1.0))  # at least +-1 point: no magnified noise
        ax.set_ylabel("change vs fp32 (percentage points)")
        ax.set_title("Accuracy change against fp32")
    else:
        ax.bar([x - 0.2 for x in xs], [a.top1 for a in acc], 0.4, label="top-1")
        ax.bar([x + 0.2 for x in xs], [a.top5 for a in acc], 0.4, label="top-5")
        ax.set_ylabel("accuracy")
        ax.set_title("Accuracy per precision")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([a.precision for a in acc], fontsize=8, rotation=20)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def make_plots(doc: ReportDoc, out: Path) -> dict[str, Path]:
    """The plots the document has figures for, in ``out``: name -> file."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    by_prec: dict[str, list[PerfResult]] = {}
    for r in doc.perf:
        by_prec.setdefault(r.precision, []).append(r)
    if by_prec:
        files["throughput"] = throughput_plot(by_prec, out / "throughput.png")
        files["latency"] = latency_plot(by_prec, out / "latency.png")
    if doc.accuracy:
        files["accuracy"] = accuracy_plot(doc, out / "accuracy.png")
    return files


def make_thumbnails(doc: ReportDoc, out: Path) -> dict[str, Path]:
    """A small JPEG tile of each sample image the job classified: file -> thumbnail."""
    from PIL import Image, ImageOps

    files: dict[str, Path] = {}
    sources = dict.fromkeys(p.source for preds in doc.classify.values() for p in preds)
    for i, src in enumerate(sources):
        try:
            with Image.open(src) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                tile = ImageOps.pad(im, (THUMB, THUMB), color=(240, 240, 240))  # same-size tiles
                out.mkdir(parents=True, exist_ok=True)
                path = out / f"{i}.jpg"
                tile.save(path, "JPEG", quality=85)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # the table still shows the predictions, without a picture
        files[src] = path
    return files
