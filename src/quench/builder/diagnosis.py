"""What ``quench diagnose`` finds: the :class:`Diagnosis` (one row per layer, most sensitive
first), how it is put together from the figures of either kind of build (INT8:
:mod:`quench.builder.diagnose`; bf16 / fp16: :mod:`quench.builder.diagnose_reduced`), and how it
is shown (terminal table, plot, HTML page)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from quench import artifact
from quench.builder.core import _manifest, _with_candidate
from quench.builder.engines import Candidate, Selection
from quench.builder.sensitivity import Effect
from quench.model import Model


@dataclass
class Diagnosis:
    source: str
    artifact: str | None
    engine: str
    calibration: dict[str, Any]
    all_int8: dict[str, float]  # the all-INT8 model's KL and agreement on calibration images
    layers: list[dict[str, Any]]  # in graph order
    ranking: list[str]  # most sensitive first
    check: dict[str, Any] | None = None
    profile: dict[str, Any] = field(default_factory=dict)
    # what the layers run in when not kept in float: int8, or bf16 / fp16 (then ``all_int8``
    # and the check's ``all_int8_*`` figures are those of every layer in that precision)
    reduced_to: str = "int8"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def row(
    layer: Any,
    precision: str,
    sqnr_db: float | None,
    base: Effect,
    each: Effect | None,
    ranking: Sequence[str],
    shares: dict[str, float],
) -> dict[str, Any]:
    """One layer's row: its precision, output SQNR, sensitivity, rank and share of time."""
    return {
        "name": layer.name,
        "op": layer.op,
        "precision": precision,
        "sqnr_db": sqnr_db,
        "kl_gain": None if each is None else round(base.kl - each.kl, 6),
        "top1_agreement_if_float": None if each is None else each.top1_agreement,
        "rank": ranking.index(layer.name) + 1 if layer.name in ranking else None,
        "time_share": round(shares.get(layer.name, 0.0), 4),
    }


def assemble(
    plan: Any,
    built: Any,
    engine: str,
    calibration: dict[str, Any],
    base: Effect,
    rows: list[dict[str, Any]],
    ranking: list[str],
    check: dict[str, Any] | None,
    profile: dict[str, Any],
    shares: dict[str, float],
    reduced_to: str = "int8",
) -> Diagnosis:
    """The :class:`Diagnosis` of ``plan``'s build from its figures."""
    return Diagnosis(
        source=str(plan.src.path),
        artifact=str(built) if built else None,
        engine=engine,
        calibration=calibration,
        all_int8=base.to_dict(),
        layers=rows,
        ranking=ranking,
        check=check,
        profile={k: profile[k] for k in ("engine", "batch", "runs", "total_ms")}
        | {"other_share": round(1 - sum(shares.values()), 4)},
        reduced_to=reduced_to,
    )


def as_model(plan: Any, candidate: Candidate) -> Model:
    """A compiled candidate as a loaded model (never written)."""
    manifest = _with_candidate(_manifest(plan), plan, candidate, Selection.unranked([candidate]))
    art = artifact.Artifact(manifest.to_dict(), dict(candidate.compiled.payloads))
    return Model(art, threads=plan.opts.threads)


def time_shares(profiled: list[dict[str, Any]], all_layers: list[Any]) -> dict[str, float]:
    """Each ONNX layer's share of the profiled time. Engines name their layers after the ONNX
    node (OpenVINO: ``NAME/WithoutBiases``; ONNX Runtime: ``NAME_token_3``) or its output
    tensor (``OUT_nchwc``); reorders and other glue stay unattributed."""
    by_name = {x.name: x.name for x in all_layers}
    by_output = {x.output: x.name for x in all_layers}
    shares: dict[str, float] = {}
    for p in profiled:
        if p["op"] == "Reorder":
            continue
        base = re.sub(r"(_token_\d+|_nchwc)+$", "", p["name"].split("/")[0])
        owner = by_name.get(base) or by_output.get(base)
        if owner:
            shares[owner] = shares.get(owner, 0.0) + p["share"]
    return shares


def table(d: Diagnosis, top: int | None = None) -> list[list[str]]:
    """Rows for the terminal: the layers in graph order (or the ``top`` most sensitive)."""
    rows = d.layers
    if top:
        rank = {n: i for i, n in enumerate(d.ranking)}
        rows = sorted((r for r in rows if r["name"] in rank), key=lambda r: rank[r["name"]])[:top]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    return [
        [
            f(r["rank"], "d"),
            r["name"],
            r["op"],
            r["precision"],
            f(r["sqnr_db"], ".1f"),
            f(r["kl_gain"], ".2e"),
            f(r["top1_agreement_if_float"], ".0%"),
            f(r["time_share"], ".1%"),
        ]
        for r in rows
    ]


COLUMNS = (
    "rank",
    "layer",
    "op",
    "precision",
    "SQNR dB",
    "KL gain if float",
    "top-1 agr. if float",
    "time",
)


def plot(d: Diagnosis, out: Path) -> Path:
    """Layers in graph order: output SQNR and sensitivity (top), share of time (bottom)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(d.layers)
    fig = Figure(figsize=(max(8, n * 0.18), 6))
    FigureCanvasAgg(fig)
    ax1, ax3 = fig.subplots(2, 1, sharex=True)
    idx = np.arange(n)
    sq = [np.nan if r["sqnr_db"] is None else min(r["sqnr_db"], 80) for r in d.layers]
    ax1.plot(idx, sq, "o-", color="tab:blue", markersize=3, label="output SQNR (dB)")
    ax1.set_ylabel("output SQNR, dB", color="tab:blue")
    ax2 = ax1.twinx()
    gain = [max(r["kl_gain"] or 0.0, 0.0) for r in d.layers]
    ax2.bar(idx, gain, color="tab:red", alpha=0.5, label="KL gain if float")
    ax2.set_ylabel("KL gain with only this layer in float", color="tab:red")
    ax1.set_title("Which layers cost accuracy (left to right in graph order)")
    ax3.bar(idx, [100 * r["time_share"] for r in d.layers], color="tab:green")
    ax3.set_ylabel(f"% of {d.engine} time")
    ax3.set_xticks(idx)
    ax3.set_xticklabels([r["name"][-28:] for r in d.layers], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def html(d: Diagnosis, png: Path) -> str:
    """A self-contained page: the plot and the table."""
    import base64
    from html import escape

    data = base64.b64encode(png.read_bytes()).decode("ascii")
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table(d)
    )
    check = ""
    if d.check:
        check = f"<p>Check images: {escape(str(d.check))}</p>"
    return (
        "<!doctype html><meta charset=utf-8><title>quench diagnose</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}"
        "td:nth-child(2),td:nth-child(3){text-align:left}</style>"
        f"<h1>quench diagnose: {escape(d.source)}</h1>"
        f"<p>Engine {escape(d.engine)}; calibration {escape(str(d.calibration))}; all-INT8 "
        f"against fp32 on calibration images: {escape(str(d.all_int8))}</p>{check}"
        f'<img alt="layers" src="data:image/png;base64,{data}">'
        f"<table><tr>{head}</tr>{body}</table>"
    )
