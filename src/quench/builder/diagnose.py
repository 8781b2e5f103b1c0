"""``quench diagnose``: which layers cost accuracy, and what each costs in time.

For every quantizable layer of an INT8 build (from an ONNX model, or re-made from an INT8
artifact's source model and recorded settings, byte for byte as its build made it): its
precision, the SQNR of its output in the all-INT8 model against fp32, its sensitivity (how much
closer the logits come to fp32 with only that layer in float, on calibration images; see
:mod:`quench.builder.sensitivity`) and its share of inference time from the engine's own
profiler (:mod:`quench.profile`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from quench import artifact
from quench.builder import repair, sensitivity
from quench.builder.core import (
    SENSITIVITY_IMAGES,
    BuildOptions,
    Log,
    _calibration_images,
    _manifest,
    _plan,
    _prepare,
    _rank_layers,
    _with_candidate,
)
from quench.builder.engines import Candidate, Reference, Selection, compile_candidates
from quench.builder.quantize.layers import layers
from quench.errors import QuenchError
from quench.evaluate import list_images, read_ground_truth
from quench.imaging import Normalizer
from quench.model import Model
from quench.precision import Precision
from quench.profile import profile_model
from quench.zoo.fetch import sha256_file

PROFILE_RUNS = 10


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


def options_of(path: Path, source: Path | None) -> tuple[Path, BuildOptions, dict[str, Any]]:
    """An INT8 artifact's source model (``source``, else the file its build read, beside the
    artifact or in the working directory; checked against the recorded sha256), its build
    options as recorded, and its manifest."""
    art = artifact.load(path)
    m = art.manifest
    settings = dict(m.get("build") or {})
    half = Precision.parse(str((m.get("precision") or {}).get("mode"))).family == "half"
    if not m.get("quantization") and not half:
        raise QuenchError(f"{path}: not an INT8, bf16 or fp16 artifact: nothing to diagnose")
    name = (m.get("source") or {}).get("file") or ""
    found = [p for p in ([source] if source else [path.parent / name, Path(name)]) if p.is_file()]
    if not found or (not name and not source):
        raise QuenchError(
            f"{path}: its source model {name or '(unknown)'} is not beside it or here; "
            "pass --source MODEL"
        )
    src = found[0]
    want = (m.get("source") or {}).get("sha256")
    if want and sha256_file(src) != want:
        raise QuenchError(f"{src}: not the model {path} was built from (sha256 differs)")
    known = {f.name for f in fields(BuildOptions)}
    opts = BuildOptions(**{k: _tuple(v) for k, v in settings.items() if k in known})
    return src, opts, m


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def diagnose(
    model: str | Path,
    opts: BuildOptions,
    built: str | Path | None = None,
    manifest: dict[str, Any] | None = None,
    say: Log | None = None,
) -> Diagnosis:
    """Diagnose the INT8 build of ``model`` with ``opts`` (``built``: the artifact made from
    them, whose layer precisions and engine the report then shows)."""
    say = say or (lambda msg: None)
    if not opts.calib_images:
        raise QuenchError("diagnose needs --calib-images (a folder or list)")
    opts = replace(opts, float_layers=())  # the all-INT8 model: what sensitivity starts from
    plan = _plan(model, opts, say)
    if plan.precision.family == "half":
        from quench.builder import diagnose_reduced

        return diagnose_reduced.diagnose(plan, built, manifest, say)
    if not plan.precision.is_int8:
        raise QuenchError(f"diagnose needs an INT8, bf16 or fp16 precision, not {opts.precision}")
    calib = _calibration_images(opts, plan.preset, say)
    prepared = _prepare(plan, calib, say)[0]
    assert prepared.float_model is not None
    spec = plan.spec
    qdq, float_model = plan.at_reference_batch(prepared.model), prepared.float_model
    all_layers = layers(qdq)
    names = [x.name for x in all_layers if x.precision == "int8"]
    x = calib.tensor[:SENSITIVITY_IMAGES]
    probe = calib.held_out if calib.held_out is not None and len(calib.held_out) else x
    say(f"output SQNR of {len(all_layers)} layers on {len(probe)} held-out calibration images")
    sqnr = sensitivity.layer_sqnr(qdq, float_model, spec.input_name, probe)
    base, each, ranking = _rank_layers(plan, qdq, float_model, x, names)
    in_artifact = ((manifest or {}).get("quantization") or {}).get("layers") or {}

    if built is not None:
        engine_model = Model.load(built)
    else:
        reference = Reference.of(plan.fixed, spec, plan.preset.data.input_shape)
        candidate = compile_candidates(
            [prepared], plan.engines[:1], spec, reference, False, say, plan.src.path
        )[0]
        engine_model = _as_model(plan, candidate)
    with engine_model:
        say(f"profiling {engine_model.engine} ({PROFILE_RUNS} runs)")
        batch = engine_model.fixed_batch or 8
        inputs = calib.pixels if engine_model.data.pixels else calib.tensor  # --input uint8
        profile = profile_model(engine_model, batch, PROFILE_RUNS, inputs)
        check = _check(plan, qdq, engine_model, opts) if opts.check_images else None
    shares = _time_shares(profile["layers"], all_layers)
    rows = []
    for layer in all_layers:
        e = each.get(layer.name)
        rows.append(
            {
                "name": layer.name,
                "op": layer.op,
                "precision": in_artifact.get(layer.name, layer.precision),
                "sqnr_db": sqnr.get(layer.name),
                "kl_gain": None if e is None else round(base.kl - e.kl, 6),
                "top1_agreement_if_float": None if e is None else e.top1_agreement,
                "rank": ranking.index(layer.name) + 1 if layer.name in ranking else None,
                "time_share": round(shares.get(layer.name, 0.0), 4),
            }
        )
    return Diagnosis(
        source=str(plan.src.path),
        artifact=str(built) if built else None,
        engine=engine_model.engine,
        calibration={**calib.describe(), "sensitivity_images": len(x)},
        all_int8=base.to_dict(),
        layers=rows,
        ranking=ranking,
        check=check,
        profile={k: profile[k] for k in ("engine", "batch", "runs", "total_ms")}
        | {"other_share": round(1 - sum(shares.values()), 4)},
    )


def _as_model(plan: Any, candidate: Candidate) -> Model:
    """A compiled candidate as a loaded model (never written)."""
    manifest = _with_candidate(_manifest(plan), plan, candidate, Selection.unranked([candidate]))
    art = artifact.Artifact(manifest.to_dict(), dict(candidate.compiled.payloads))
    return Model(art, threads=plan.opts.threads)


def _check(plan: Any, qdq: Any, engine_model: Model, opts: BuildOptions) -> dict[str, Any]:
    """Top-1 drop against fp32 on the check images: the all-INT8 model (simulated) and the
    engine's model (the artifact's mix, or all INT8)."""
    assert opts.check_images is not None
    truth = read_ground_truth(opts.check_labels) if opts.check_labels else None
    given, labels, _ = repair.read_check_images(  # as the engine's model takes them
        list_images(opts.check_images), engine_model.data, truth, opts.progress
    )
    x = Normalizer(plan.preset.data).batch(given) if engine_model.data.pixels else given
    spec = plan.spec
    ref = sensitivity.run(plan.dynamic, spec.input_name, x)[spec.output_name]
    check = repair.CheckSet(x, ref.argmax(1), labels)
    all_int8 = sensitivity.run(qdq, spec.input_name, x)[spec.output_name]
    return {
        "images": len(x),
        "measure": "labels" if labels is not None else "agreement with fp32 top-1",
        "all_int8_top1_drop_points": round(check.drop(all_int8), 4),
        "engine_top1_drop_points": round(check.drop(engine_model.predict(given)), 4),
    }


def _time_shares(profiled: list[dict[str, Any]], all_layers: list[Any]) -> dict[str, float]:
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
