"""One function per kind of row bench/run.py measures: the replica and the clock first, the
Quench builds, then each family's peers and Quench timings, and the INT8 rows again with
OpenVINO's kernels capped at an older CPU class."""

from __future__ import annotations

import argparse
import json
import os
import re

import openvino as ov
from common import Runner, ov_version, rel, version

from quench.clock import core_clock
from quench.graph import count_macs, load_model
from quench.hw import reported_clock_hz
from r50.config import (
    CHW,
    ISA_CLASS,
    MODEL_NAME,
    NNCF_HINTS,
    NNCF_IR,
    OV_PRECISION_FAMILY,
    OV_SOURCE_CONFIGS,
    QUENCH,
    REQUESTS_MODES,
    Built,
    Clock,
    Prep,
    QuenchBuild,
    Row,
    say,
)
from r50.measure import Bench, fill_from_perf, ov_precision_name
from r50.steps import prep_step


def measure_machine_clock(args: argparse.Namespace, env: dict[str, str]) -> Clock:
    """The reported clock, and the measured one exported (before quench.hw caches its clock)."""
    reported_hz, reported_how = reported_clock_hz()
    reported = reported_hz / 1e9 if reported_hz is not None else None
    say("measuring the clock")
    clock = core_clock()  # Quench's own measurement (quench.clock), cached per boot
    ghz = clock.ghz if clock.source == "measured" else None
    if ghz:
        os.environ["QUENCH_CPU_CLOCK_GHZ"] = env["QUENCH_CPU_CLOCK_GHZ"] = f"{ghz:.3f}"
    say(f"clock: {clock.describe()}")
    return Clock(reported, reported_how, ghz, clock.how)


def make_replica(b: Bench) -> int | None:
    """Write the ResNet-50 replica unless the work dir has it; its MACs per image."""
    if not b.src.exists():
        say("writing the ResNet-50 replica")
        cmd = [rel(QUENCH), "zoo", "synth", MODEL_NAME, "-o", rel(b.src)]
        p = b.runner.run("synth", cmd, timeout=600)
        if not p.ok:
            say("cannot make the model; writing what there is")
            b.notes.append(f"model generation failed: {p.error()}")
    b.notes.insert(0, f"Model file: `{rel(b.src)}`.")
    macs = None
    if b.src.exists():
        try:
            macs = count_macs(load_model(b.src).model, CHW)
        except Exception as exc:
            b.notes.append(f"MAC count failed: {type(exc).__name__}: {exc}")
    if "int8" in b.families and not b.args.calib_images.exists():
        b.notes.append(f"calibration images {rel(b.args.calib_images)} not found")
    return macs


def openvino_default_precision() -> str:
    """OpenVINO's default CPU inference precision (its name, e.g. f32 or bf16)."""
    try:
        found = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))
        m = re.search(r"'(\w+)'", found)
        return m[1] if m else found
    except Exception:
        return "f32"


def build_quench(b: Bench, q: QuenchBuild) -> Built:
    """``quench build`` one configuration (INT8: calibrating for real, no cache reused)."""
    art = b.work / f"r50-{q.name}.quench"
    art.unlink(missing_ok=True)
    cmd = [rel(QUENCH), "build", rel(b.src), "-o", rel(art), "--precision", q.mode, "--json"]
    cmd += q.flags
    if q.family == "int8":
        cache = b.work / f"calib-{q.name}.json"
        cache.unlink(missing_ok=True)  # calibrate for real: honest build time
        cmd += ["--calib-images", rel(b.args.calib_images), "--calib-count"]
        cmd += [str(b.args.calib_count), "--calib-cache", rel(cache)]
    say(f"quench build {q.label}")
    p = b.runner.run(f"build-{q.name}", cmd, 1800 if q.family == "int8" else 900)
    row = Row(q.family, "quench", f"Quench {q.label}", "", "float32", mode=q.label)
    row.commands.append(p.cmd)
    detail = ""
    if p.ok:
        try:
            m = json.loads(p.stdout)
            prec, eng = m.get("precision", {}), m.get("engine", {})
            row.settings = f"engine {eng.get('name', '?')}, computes {prec.get('computes')}"
            detail = row.settings
        except ValueError:
            row.settings = "(manifest not parsed)"
    error = None if p.ok else p.error()
    label = f"quench build --precision {q.label}"
    b.preps.append(Prep(label, q.family, p.seconds if p.ok else None, p.cmd, error, detail))
    if not p.ok or not art.exists():
        row.errors.append(f"build: {p.error() if not p.ok else 'no artifact'}")
    return Built(q, row, art if p.ok and art.exists() else None)


def quench_rows(b: Bench, family: str) -> None:
    """Time the family's Quench artifacts (also with 2 requests in flight, for some modes)."""
    for built in b.built:
        q, row, art = built.build, built.row, built.artifact
        if q.family != family:
            continue
        if art is not None:
            say(f"quench perf {q.label}")
            p, doc = b.perf(f"perf-{q.name}", art, b.work / f"r50-{q.name}.json")
            row.commands.pop()  # the build line is listed under model preparation
            fill_from_perf(row, p, doc, keep_peak=True)
        b.rows.append(row)
        if art is not None and q.label in REQUESTS_MODES:
            more = Row(family, "quench", f"Quench {q.label}, 2 requests", row.settings, "float32")
            more.mode = f"{q.label} (2 requests)"
            say(f"quench perf {q.label} --requests 2")
            out = b.work / f"r50-{q.name}-2req.json"
            p, doc = b.perf(f"perf-{q.name}-2req", art, out, ["--requests", "2"])
            fill_from_perf(more, p, doc, keep_peak=True)
            b.rows.append(more)


def ort_fp32_row(b: Bench) -> None:
    """Plain ONNX Runtime on the source model (quench perf on an .onnx file)."""
    say("ONNX Runtime fp32 (quench perf on the source ONNX)")
    label = f"ONNX Runtime {version('onnxruntime')}"
    row = Row("fp32", "peer", label, "InferenceSession(path), defaults", "float32")
    p, doc = b.perf("ort-fp32", b.src, b.work / "ort-fp32.json")
    fill_from_perf(row, p, doc, keep_peak=False)
    b.rows.append(row)


def benchmark_app_rows(b: Bench, group: str, ov_default: str) -> None:
    """benchmark_app on the source model, each configuration whose family is ``group``."""
    default_family = OV_PRECISION_FAMILY.get(ov_precision_name(ov_default) or "f32", "fp32")
    for c in OV_SOURCE_CONFIGS:
        family = default_family if c.family == "default" else c.family
        if family != group or family not in b.families:
            continue
        label = f"OpenVINO {ov_version()} benchmark_app"
        row = Row(family, "peer", label, c.settings, c.compute)
        say(f"{label}: {c.settings}")
        seen = b.benchmark_app(row, b.src, list(c.flags))
        if c.family == "default":
            prec = ov_precision_name(seen.get("precision")) or ov_precision_name(ov_default)
            row.family = OV_PRECISION_FAMILY.get(prec or "f32", "fp32")
            row.compute = {"bf16": "bfloat16", "f16": "float16"}.get(prec or "", "float32")
        b.rows.append(row)


def ort_int8_row(b: Bench) -> None:
    """ONNX Runtime's INT8 route: quantize_static (QDQ), then quench perf on the QDQ model."""
    qdq = b.work / "ort-int8-qdq.onnx"
    label = "ONNX Runtime quantize_static (QDQ)"
    prep = prep_step(b.runner, label, "int8", "ort-int8", b.src, qdq, b.args)
    prep.detail += "; quant_pre_process + QDQ, per-channel, U8 activations, S8 weights, MinMax"
    b.preps.append(prep)
    row = Row(
        "int8",
        "peer",
        f"ONNX Runtime {version('onnxruntime')} INT8",
        "quantize_static QDQ U8S8 per-channel MinMax; default session",
        "int8",
    )
    if prep.error:
        row.errors.append(f"quantization: {prep.error}")
        row.commands.append(prep.command)
    else:
        say("ONNX Runtime INT8 (quench perf on the QDQ model)")
        p, doc = b.perf("ort-int8", qdq, b.work / "ort-int8.json")
        fill_from_perf(row, p, doc, keep_peak=False)
    b.rows.append(row)


def nncf_rows(b: Bench, family: str, runner: Runner, error: str | None, tag: str = "") -> None:
    """benchmark_app on the NNCF INT8 model, one row per hint (``error``: no model to run)."""
    ir = b.work / NNCF_IR
    for settings, extra in NNCF_HINTS:
        label = f"OpenVINO {ov_version()} + NNCF {version('nncf')} INT8"
        row = Row(family, "peer", label, f"benchmark_app, {settings}", "int8")
        if error:
            row.errors.append(error)
        else:
            say(f"{tag}{label}: {settings}")
            b.benchmark_app(row, ir, list(extra), runner)
        b.rows.append(row)


def nncf_int8_rows(b: Bench) -> None:
    """OpenVINO's INT8 route: nncf.quantize with its defaults, then benchmark_app."""
    ir = b.work / NNCF_IR
    label = "OpenVINO + NNCF nncf.quantize"
    prep = prep_step(b.runner, label, "int8", "nncf-int8", b.src, ir, b.args)
    prep.detail += "; nncf.quantize defaults, ov.save_model"
    b.preps.append(prep)
    nncf_rows(b, "int8", b.runner, f"quantization: {prep.error}" if prep.error else None)


def capped_rows(b: Bench, cap: str) -> None:
    """The NNCF model and the OpenVINO-engine INT8 artifacts again, OpenVINO's kernels capped
    at ``cap`` (what a CPU of that class runs): the same files on an older CPU class."""
    family = f"int8@{cap}"
    title = f"INT8 on the {ISA_CLASS.get(cap, cap)} path (ONEDNN_MAX_CPU_ISA={cap})"
    b.capped_titles[family] = title
    capped = b.runner.with_env(ONEDNN_MAX_CPU_ISA=cap)
    missing = None if (b.work / NNCF_IR).exists() else "no NNCF model (see the INT8 section)"
    nncf_rows(b, family, capped, missing, f"[{cap}] ")
    for built in b.built:
        q, base, art = built.build, built.row, built.artifact
        if q.family != "int8" or art is None or "engine openvino" not in base.settings:
            continue  # ONNX Runtime has no ISA switch: its rows would be this CPU's again
        row = Row(family, "quench", f"Quench {q.label} (same artifact)", base.settings, "int8")
        row.mode = f"{q.label} [{cap}]"
        say(f"[{cap}] quench perf {q.label}")
        out = b.work / f"r50-{q.name}-{cap}.json"
        p, doc = b.perf(f"perf-{q.name}-{cap}", art, out, runner=capped)
        fill_from_perf(row, p, doc, keep_peak=False)
        b.rows.append(row)
    b.notes.append(
        f"{title}: the INT8 artifacts and NNCF model above, run with OpenVINO's "
        f"kernels capped at {cap} (what a CPU of that class runs). ONNX Runtime has no such "
        "switch, so its rows and ONNX Runtime-engine artifacts are not repeated there; % of "
        "peak is left out (the peak would be this CPU's)."
    )
