#!/usr/bin/env python3
"""Peers vs Quench on one machine, in one run: writes BENCHMARKS.md.

Measures, on the ResNet-50 v1 replica and at each batch size: plain ONNX Runtime (fp32, and the
ORT INT8 route: quant_pre_process + quantize_static QDQ), OpenVINO's own ``benchmark_app``
(f32 pinned, its default hint, bf16 pinned), OpenVINO + NNCF INT8 (default parameters), and
``quench build`` + ``quench perf`` in every precision mode; then ``quench serve`` under load,
the end-to-end pipeline on real JPEGs and the peak memory of ``quench infer``. Quench's
artifacts are built first; each family's Quench timings then directly follow its peers'.
Every number in the report comes from this run; failures are recorded, never fatal.

    .venv/bin/python bench/run.py [--batches 1,4,8] [--duration 10] [--only fp32,bf16,int8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import openvino as ov
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from quench import precision
from quench.builder.calibration import load_calibration
from quench.clock import core_clock
from quench.evaluate import list_images
from quench.graph import count_macs, load_model, real_inputs
from quench.hw import cpu_info, cpuinfo_fields, default_threads, reported_clock_hz
from quench.perf import peak_macs
from quench.presets import get_preset
from quench.stats import RULE, compare

FP32 = precision.FORCE_FLOAT32
INT8 = precision.QINT8_MIXED_FLOAT32
INT8_F16 = precision.QINT8_MIXED_FLOAT16

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUENCH = BIN / "quench"
BENCHMARK_APP = BIN / "benchmark_app"
MODEL_NAME = "resnet50-v1-7"
CHW = (3, 224, 224)
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "imagenet-sample" / "calib.txt"
DEFAULT_VAL = DEFAULT_CALIB.with_name("val.txt")

FAMILIES = ("fp32", "bf16", "int8")
FAMILY_ALIASES = {"fp32": "fp32", "f32": "fp32", "bf16": "bf16", "fp16": "bf16", "int8": "int8"}
FAMILY_TITLE = {
    "fp32": "FP32",
    "bf16": "Reduced precision (bf16 / fp16)",
    "int8": "INT8",
}
FAMILY_COMPUTE = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}


@dataclass(frozen=True)
class QuenchBuild:
    """One ``quench build`` of the replica: a precision mode, and extra flags for a variant
    measured as a row of its own."""

    mode: str
    family: str
    variant: str = ""  # the row label's suffix for a build with extra flags
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """For file names."""
        return f"{self.mode}-{self.variant}" if self.variant else self.mode

    @property
    def label(self) -> str:
        return f"{self.mode} --{self.variant}" if self.variant else self.mode


@dataclass(frozen=True)
class BenchmarkApp:
    """One ``benchmark_app`` configuration on the source model."""

    family: str  # "default": the family of OpenVINO's own default precision on this CPU
    settings: str
    flags: tuple[str, ...]
    compute: str  # "?": OpenVINO's default, read from benchmark_app's output


# -- the configurations measured, in table order ---------------------------------------------

QUENCH_BUILDS = (
    QuenchBuild(FP32.name, "fp32"),
    QuenchBuild(precision.FORCE_BFLOAT16.name, "bf16"),
    QuenchBuild(precision.FORCE_FLOAT16.name, "bf16"),
    QuenchBuild(INT8.name, "int8"),
    QuenchBuild(INT8.name, "int8", "float-first-layer", ("--float-first-layer",)),
    QuenchBuild(INT8_F16.name, "int8"),
)
OV_SOURCE_CONFIGS = (
    BenchmarkApp(
        "fp32", "f32, latency hint", ("-hint", "latency", "-infer_precision", "f32"), "float32"
    ),
    BenchmarkApp("default", "default hint and precision", (), "?"),
    BenchmarkApp(
        "bf16", "bf16, latency hint", ("-hint", "latency", "-infer_precision", "bf16"), "bfloat16"
    ),
)
NNCF_IR = "nncf-int8.xml"  # in the work dir
NNCF_HINTS = (("default hint", ()), ("latency hint", ("-hint", "latency")))
# Also timed with two requests in flight, as benchmark_app's default throughput hint runs
REQUESTS_MODES = (FP32.name, precision.FORCE_BFLOAT16.name, INT8.name)
SERVE_MODES = (FP32.name, INT8.name)
PIPELINE_MODES = (FP32.name, precision.FORCE_BFLOAT16.name, INT8.name)
MEMORY_MODE = INT8.name  # the fastest engine: the most images in flight per second
ISA_CLASS = {"AVX2": "AVX2-only", "AVX512_CORE": "AVX-512 without VNNI"}
OV_PRECISION_FAMILY = {"f32": "fp32", "bf16": "bf16", "f16": "bf16"}


T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


def rel(p: Path | str) -> str:
    """A path as written in commands: relative to the repo root (the subprocesses' cwd)."""
    p = Path(p).absolute()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"(error\b|\w*(Error|Exception)\b)", ln, re.IGNORECASE) or "[ ERROR ]" in ln:
            return ln[:400]
    return (lines[-1] if lines else "no output")[:400]


# -- running things -------------------------------------------------------------------------


@dataclass
class Proc:
    cmd: str
    rc: int | None  # None: timed out or could not start
    out: str  # stdout + stderr
    seconds: float
    log: str
    stdout: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def error(self) -> str:
        if self.rc is None:
            return first_error(self.out)
        return f"exit {self.rc}: {first_error(self.out)}"


class Runner:
    def __init__(
        self, work: Path, env: dict[str, str], counter: Iterator[int] | None = None
    ) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.counter = counter or itertools.count(1)
        self.prefix = " ".join(f"{k}={v}" for k, v in env.items() if k == "ONEDNN_MAX_CPU_ISA")

    def with_env(self, **extra: str) -> Runner:
        """The same runner (one log numbering) with more environment variables."""
        return Runner(self.work, {**self.env, **extra}, self.counter)

    def run(self, name: str, cmd: list[str], timeout: float) -> Proc:
        count = next(self.counter)
        log = self.logs / f"{count:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"
        text = f"{self.prefix} {shlex.join(cmd)}".strip()
        t = time.perf_counter()
        try:
            p = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        except OSError as exc:
            proc = Proc(text, None, f"error: cannot start: {exc}", 0.0, rel(log))
        else:
            try:
                out, errs = p.communicate(timeout=timeout)
                rc: int | None = p.returncode
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, errs = p.communicate()
                errs += f"\nerror: timed out after {timeout:.0f} s"
                rc = None
            both = f"{out}\n{errs}" if out and errs else out or errs
            proc = Proc(text, rc, both, time.perf_counter() - t, rel(log), out)
        log.write_text(f"$ {text}\n# rc={proc.rc} seconds={proc.seconds:.1f}\n{proc.out}")
        if not proc.ok:
            say(f"  FAILED ({proc.error()}); log {proc.log}")
        return proc


# -- machine --------------------------------------------------------------------------------


def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))}, kernel {platform.release()}"
    except OSError:
        pass
    return platform.platform()


def ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def ov_version() -> str:
    """OpenVINO's version without its build suffix."""
    return version("openvino").split("-")[0]


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{rev}{' + uncommitted changes' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# -- results --------------------------------------------------------------------------------


@dataclass
class Row:
    family: str
    kind: str  # "peer" | "quench"
    label: str
    settings: str
    compute: str  # for the share of peak: float32 | bfloat16 | float16 | int8
    qps: dict[int, float] = field(default_factory=dict)
    rounds: dict[int, list[float]] = field(default_factory=dict)  # qps of each round
    p50: dict[int, float] = field(default_factory=dict)
    p99: dict[int, float] = field(default_factory=dict)
    peak: dict[int, float] = field(default_factory=dict)  # share of peak, 0..1
    device: str = "cpu"
    commands: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mode: str = ""  # quench precision mode
    model: str = MODEL_NAME


@dataclass
class Prep:
    """A model-preparation step (peer quantization or quench build)."""

    label: str
    family: str
    seconds: float | None
    command: str
    error: str | None = None
    detail: str = ""


# -- peers ----------------------------------------------------------------------------------


def quench_perf(
    runner: Runner,
    name: str,
    model: Path,
    out: Path,
    batches: list[int],
    duration: float,
    extra: list[str] | None = None,
) -> tuple[Proc, dict[str, Any] | None]:
    out.unlink(missing_ok=True)
    cmd = [
        rel(QUENCH),
        "perf",
        rel(model),
        "--batch",
        ",".join(map(str, batches)),
        "--duration",
        f"{duration:g}",
        "--json",
        rel(out),
        "-q",
        *(extra or []),
    ]
    timeout = 180 + len(batches) * (2 * duration + 90)
    p = runner.run(name, cmd, timeout)
    doc = None
    if p.ok:
        try:
            doc = json.loads(out.read_text())
        except (OSError, ValueError) as exc:
            p.rc, p.out = 1, p.out + f"\nerror: no JSON results ({exc})"
    return p, doc


def fill_from_perf(row: Row, p: Proc, doc: dict[str, Any] | None, keep_peak: bool) -> None:
    row.commands.append(p.cmd)
    if doc is None:
        row.errors.append(p.error())
        return
    for r in doc["results"]:
        b = int(r["batch"])
        row.qps[b] = float(r["qps"])
        row.rounds[b] = [float(x["qps"]) for x in r.get("rounds", [])]
        row.p50[b] = float(r["latency_ms"]["p50"])
        row.p99[b] = float(r["latency_ms"]["p99"])
        if keep_peak and r.get("peak_share") is not None:
            row.peak[b] = float(r["peak_share"])
        row.device = f"cpu ({r['engine']}, {r['threads']} threads)"
        if row.kind == "quench":
            row.compute = r.get("compute", row.compute)
            row.model = r.get("model", row.model)


BA_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def parse_benchmark_app(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    pats = {
        "fps": rf"Throughput:\s*{BA_NUM}\s*FPS",
        "median": rf"Median:\s*{BA_NUM}\s*ms",
        "pct": rf"(\d+) percentile:\s*{BA_NUM}\s*ms",
        "count": r"Count:\s*(\d+)\s*iterations",
        "duration": rf"Duration:\s*{BA_NUM}\s*ms",
        "precision": r"INFERENCE_PRECISION_HINT:\s*<Type: '(\w+)'>",
        "hint": r"PERFORMANCE_HINT:\s*(\w+)",
        "streams": r"NUM_STREAMS:\s*(\d+)",
        "requests": r"Measuring performance \(.*?(\d+) inference requests?",
        "mode": r"Start inference (\w+)",
    }
    for key, pat in pats.items():
        m = re.search(pat, out)
        if m:
            res[key] = m.groups() if key == "pct" else m[1]
    return res


def ov_precision_name(t: str | None) -> str | None:
    return {"bfloat16": "bf16", "f32": "f32", "float32": "f32", "f16": "f16", "float16": "f16"}.get(
        t or ""
    )


def run_benchmark_app(
    runner: Runner,
    row: Row,
    model: Path,
    extra: list[str],
    batches: list[int],
    duration: float,
    rounds: int = 3,
) -> dict[str, Any]:
    """benchmark_app at each batch size, ``rounds`` runs of ``duration / rounds`` seconds each
    (their spread is the noise a comparison must beat), + one -latency_percentile 99 run at the
    smallest."""
    seen: dict[str, Any] = {}
    for b in batches:
        cmd = [
            rel(BENCHMARK_APP),
            "-m",
            rel(model),
            "-d",
            "CPU",
            *extra,
            "-shape",
            f"[{b},{','.join(map(str, CHW))}]",
            "-t",
            f"{duration / rounds:g}",
        ]
        fps, medians = [], []
        for k in range(rounds):
            say(f"  {row.label}: batch {b}, round {k + 1}/{rounds}")
            p = runner.run(f"ba-{row.label}-b{b}-r{k + 1}", cmd, 240 + 3 * duration)
            row.commands.append(p.cmd)
            r = parse_benchmark_app(p.out)
            if not p.ok or "fps" not in r:
                row.errors.append(f"batch {b}: {p.error() if not p.ok else 'no Throughput line'}")
                break
            fps.append(float(r["fps"]))
            if "median" in r:
                medians.append(float(r["median"]))
            if "count" in r and "duration" in r:
                own = b * int(r["count"]) / (float(r["duration"]) / 1e3)
                if abs(own - fps[-1]) > 0.05 * fps[-1]:
                    row.notes.append(
                        f"batch {b}: Throughput {fps[-1]:.1f} FPS but batch x count / duration "
                        f"= {own:.1f}"
                    )
            if not seen:
                seen = r
        if len(fps) < rounds:
            continue
        row.rounds[b] = fps
        row.qps[b] = statistics.fmean(fps)
        if medians:
            row.p50[b] = statistics.median(medians)
        if b == min(batches):
            p99 = [*cmd, "-latency_percentile", "99"]
            say(f"  {row.label}: batch {b}, p99 run")
            q = runner.run(f"ba-{row.label}-b{b}-p99", p99, 240 + 3 * duration)
            row.commands.append(q.cmd)
            rq = parse_benchmark_app(q.out)
            if q.ok and rq.get("pct"):
                row.p99[b] = float(rq["pct"][1])
            else:
                row.errors.append(f"batch {b} p99 run: {q.error() if not q.ok else 'no line'}")
    if seen:
        prec = ov_precision_name(seen.get("precision"))
        reqs = f"{seen['requests']} requests, " if seen.get("requests") else ""
        row.settings += (
            f"; ran as: {seen.get('hint', '?').lower()} hint, inference precision "
            f"{prec or '?'}, {seen.get('streams', '?')} stream(s), {reqs}"
            f"{seen.get('mode', '?')}"
        )
        row.device = "cpu (OpenVINO benchmark_app)"
    return seen


def ort_int8_step(args: argparse.Namespace) -> int:
    """Hidden step: the ORT user's INT8 route (quant_pre_process + quantize_static, QDQ)."""
    t = time.perf_counter()
    src, dest = Path(args.model), Path(args.dest)
    calib = load_calibration(
        args.calib_images, get_preset(MODEL_NAME).data, args.calib_count, progress=False
    )
    m = onnx.load(str(src), load_external_data=False)
    name = real_inputs(m)[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, Any] | None:
            if self.i >= len(calib.tensor):
                return None
            self.i += 1
            return {name: calib.tensor[self.i - 1 : self.i]}

    notes = []
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        # Per-channel QDQ needs DequantizeLinear's axis (opset 13); quantize_static only lifts
        # old models to opset 11 and then writes an invalid graph. Convert first, as ORT's
        # quantization docs advise, with ONNX's own version converter.
        m = version_converter.convert_version(onnx.load(str(src)), 13)
        m.ir_version = max(m.ir_version, 7)  # opset 13's IR: initializers need not be inputs
        # ... and must not be, or ORT treats them as overridable inputs and folds nothing (its
        # warning points to remove_initializer_from_input.py, which does this):
        keep = real_inputs(m)
        del m.graph.input[:]
        m.graph.input.extend(keep)
        src = dest.with_name(dest.stem + "-opset13.onnx")
        onnx.save(m, str(src))
        notes.append(
            f"source opset {opset} converted to 13 (onnx.version_converter, IR 7, initializers "
            "removed from the graph inputs)"
        )
    pre = dest.with_name(dest.stem + "-preprocessed.onnx")
    try:
        import sympy  # noqa: F401  (symbolic shape inference needs it)

        skip_symbolic = False
    except ImportError:
        skip_symbolic = True  # what ORT's own error message suggests without sympy
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=skip_symbolic)
    quantize_static(
        str(pre),
        str(dest),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    if skip_symbolic:
        notes.append("sympy not installed: quant_pre_process(skip_symbolic_shape=True)")
    done = {
        "seconds": time.perf_counter() - t,
        "images": len(calib.files),
        "note": "; ".join(notes),
    }
    print(json.dumps(done))
    return 0


def nncf_int8_step(args: argparse.Namespace) -> int:
    """Hidden step: the OpenVINO user's INT8 route (nncf.quantize, default parameters)."""
    import nncf  # the bench extra, needed by this step only

    t = time.perf_counter()
    calib = load_calibration(
        args.calib_images, get_preset(MODEL_NAME).data, args.calib_count, progress=False
    )
    model = ov.Core().read_model(args.model)
    items = [calib.tensor[i : i + 1] for i in range(len(calib.tensor))]
    quantized = nncf.quantize(model, nncf.Dataset(items))
    ov.save_model(quantized, args.dest)
    print(json.dumps({"seconds": time.perf_counter() - t, "images": len(calib.files)}))
    return 0


def rss_step(args: argparse.Namespace) -> int:
    """Run the command given as a JSON list in ``--cmd`` and print its peak resident memory
    (this process has no other children, so RUSAGE_CHILDREN is that command's own)."""
    cmd = json.loads(args.cmd)
    t = time.perf_counter()
    rc = subprocess.call(cmd, cwd=REPO)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t, "peak_rss_kib": peak_kib}))
    return 0 if rc == 0 else 1


def prep_step(
    runner: Runner, label: str, family: str, step: str, model: Path, dest: Path, args: Any
) -> Prep:
    dest.unlink(missing_ok=True)
    cmd = [
        rel(sys.executable),
        rel(Path(__file__)),
        "--step",
        step,
        "--model",
        rel(model),
        "--dest",
        rel(dest),
        "--calib-images",
        rel(args.calib_images),
        "--calib-count",
        str(args.calib_count),
    ]
    say(f"{label}: quantizing")
    p = runner.run(step, cmd, 1800)
    if not p.ok or not dest.exists():
        return Prep(label, family, None, p.cmd, p.error() if not p.ok else "no output model")
    detail = f"{args.calib_count} calibration images"
    try:
        done = json.loads(p.stdout.strip().splitlines()[-1])
        detail = f"{done['images']} calibration images" + (
            f" ({done['note']})" if done.get("note") else ""
        )
    except (ValueError, IndexError, KeyError, TypeError):
        pass
    return Prep(label, family, p.seconds, p.cmd, detail=detail)


# -- report ---------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def ratio_cell(quench: Row, peer: Row, b: int) -> str:
    """Quench / peer throughput, marked by whether the difference is beyond the rounds' noise."""
    text = f"{quench.qps[b] / peer.qps[b]:.2f}x"
    if not quench.rounds.get(b) or not peer.rounds.get(b):
        return f"{text} (no rounds)"
    c = compare(quench.rounds[b], peer.rounds[b])
    return {"a": f"**{text}**", "b": text, "tie": f"{text} (tie)"}[c.winner]


def family_table(rows: list[Row], batches: list[int]) -> list[str]:
    b0, bmax = min(batches), max(batches)
    peers = [r for r in rows if r.kind == "peer"]
    best = {b: max((r.qps[b] for r in peers if b in r.qps), default=None) for b in batches}
    head = (
        ["Config", "Settings"]
        + [f"qps b={b}" for b in batches]
        + [f"p50 ms b={b0}", f"p99 ms b={b0}"]
        + [f"Quench / best peer b={b}" for b in batches]
        + [f"% of peak b={bmax}"]
    )
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        ratios = []
        for b in batches:
            if r.kind == "quench" and b in r.qps and best[b]:
                ratios.append(ratio_cell(r, next(p for p in peers if p.qps.get(b) == best[b]), b))
            else:
                ratios.append("")
        cells = (
            [f"**{r.label}**" if r.kind == "quench" else r.label, r.settings]
            + [fmt(r.qps.get(b)) for b in batches]
            + [fmt(r.p50.get(b0), 2), fmt(r.p99.get(b0), 2)]
            + ratios
            + [pct(r.peak.get(bmax))]
        )
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    lines.append(
        f"- Quench / best peer: **bold** when Quench is faster beyond the noise, (tie) when the "
        f"difference is inside it ({RULE}; Quench's rounds against the peer's)."
    )
    for b in batches:
        if best[b]:
            who = next(r.label for r in peers if r.qps.get(b) == best[b])
            lines.append(f"- best peer at b={b}: {who}, {best[b]:,.1f} qps")
    for r in rows:
        for e in r.errors:
            lines.append(f"- {r.label}: **failed** {e}")
        for n in r.notes:
            lines.append(f"- {r.label}: {n}")
    return lines


def measured_section(
    title: str,
    intro: str,
    columns: list[str],
    entries: list[dict[str, Any]],
    key: str,
    cells: Callable[[dict[str, Any]], list[str]],
) -> list[str]:
    """A report section: a table with a row per entry (or its error), then the commands."""
    if not entries:
        return []
    out = [f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |"]
    out.append("|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
    for e in entries:
        if "error" in e:
            row = [str(e[key]), f"**failed**: {e['error']}", *[""] * (len(columns) - 2)]
        else:
            row = [str(e[key]), *cells(e)]
        out.append("| " + " | ".join(row) + " |")
    return [*out, "", "```", *[e["command"] for e in entries], "```", ""]


def write_report(b: Bench, machine: list[tuple[str, str]], started: datetime) -> None:
    """BENCHMARKS.md: every section from this run's measurements."""
    titles = {**FAMILY_TITLE, **b.capped_titles}
    out = [
        *report_header(machine, started),
        *family_sections(b, titles),
        *accuracy_section(b.accuracy),
        *magicmind_section(b),
        *serving_section(b.serving),
        *pipeline_section(b.pipeline, b.args.images),
        *memory_section(b.memory),
        *builds_section(b.preps),
        *how_measured(b, titles),
        f"Logs of every command: `{rel(b.work / 'logs')}`.",
    ]
    b.args.out.parent.mkdir(parents=True, exist_ok=True)
    b.args.out.write_text("\n".join(out) + "\n")


def report_header(machine: list[tuple[str, str]], started: datetime) -> list[str]:
    return [
        "# Benchmarks: ResNet-50 v1, peers vs Quench, CPU",
        "",
        f"Produced {started:%Y-%m-%d %H:%M} UTC by one run of "
        f"`{rel(sys.executable)} {shlex.join(sys.argv)}` "
        f"(cwd {rel(Path.cwd()) if Path.cwd() != REPO else 'repo root'}; took "
        f"{(time.perf_counter() - T0) / 60:.1f} min). Every figure below comes from that run.",
        "",
        "Model: the ResNet-50 v1 replica (`quench zoo synth resnet50-v1-7`): the structure of "
        "the ONNX model zoo's resnet50-v1-7 with synthetic weights, so speeds are "
        "representative, accuracy is not. Input float32 [b,3,224,224].",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine],
        "",
    ]


def family_sections(b: Bench, titles: dict[str, str]) -> list[str]:
    """A table per family (and per capped CPU class), peers then Quench."""
    out: list[str] = []
    for fam in titles:
        frows = [r for r in b.rows if r.family == fam]
        if frows:
            out += [f"## {titles[fam]}", "", *family_table(frows, b.batches), ""]
    return out


def accuracy_section(lines: list[str]) -> list[str]:
    if not lines:
        return []
    return [
        "## INT8 accuracy per CPU class (real weights)",
        "",
        "`bench/accuracy.py`: efficientnet-lite0 and -lite1 (`../shared/models`, real "
        "ImageNet weights), calibrated on `calib.txt` (160 images; 40 held out for the "
        "build's fidelity gate), top-1 on `val.txt` (800 images), OpenVINO engine. Each "
        "artifact is built once on this CPU and evaluated on each class (the caps run "
        "OpenVINO's kernels for that class); drops are against fp32 on the same class.",
        "",
        *lines,
        "",
    ]


def magicmind_section(b: Bench) -> list[str]:
    """Quench's timed rows on this CPU as MagicMind's sample reports them."""
    qrows = [r for r in b.rows if r.kind == "quench" and r.qps and "@" not in r.family]
    if not qrows:
        return []
    out = [
        "## Quench, MagicMind-style",
        "",
        "| Model | Quant_Mode | Batch_Size | Throughput (qps) | device | % of peak |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in qrows:
        for batch in b.batches:
            if batch in r.qps:
                out.append(
                    f"| {r.model} | {r.mode} | {batch} | {r.qps[batch]:,.2f} | {r.device} | "
                    f"{pct(r.peak.get(batch))} |"
                )
    return [*out, ""]


def serving_section(entries: list[dict[str, Any]]) -> list[str]:
    return measured_section(
        "Serving: `quench serve` under load",
        "16 concurrent clients on loopback, one image per request (KServe v2 binary tensor "
        "infer), dynamic batching up to 8 images / 5 ms (`quench serve` defaults); compared "
        "with `quench perf` at batch 8 on the same artifact in this run.",
        [
            "Quant_Mode",
            "images/s served",
            "failed",
            "p50 ms",
            "p99 ms",
            "quench perf b=8",
            "served / perf",
            "server exit",
        ],
        entries,
        "mode",
        lambda e: [
            f"{e['images_per_s']:.1f}",
            str(e.get("failed")),
            fmt(e.get("latency_ms", {}).get("p50")),
            fmt(e.get("latency_ms", {}).get("p99")),
            fmt(e.get("perf_b8")),
            f"{e['images_per_s'] / e['perf_b8']:.2f}x" if e.get("perf_b8") else "-",
            str(e.get("server_exit")),
        ],
    )


def pipeline_section(entries: list[dict[str, Any]], images: Path) -> list[str]:
    return measured_section(
        "End-to-end: JPEG files to top-5",
        f"`quench perf ART --batch 8 --images {rel(images)}`: engine-only qps (random "
        "batch), then every file through the pipeline (decode + resize + normalise on "
        "worker threads, overlapped with inference), then a naive loop (decode a batch, "
        "then infer it), in one command.",
        [
            "Quant_Mode",
            "engine-only qps",
            "pipeline images/s",
            "pipeline / engine",
            "naive loop images/s",
            "images",
        ],
        entries,
        "mode",
        lambda e: [
            f"{e['engine_qps']:.1f}",
            f"{e['pipeline']:.1f}",
            f"{e['pipeline'] / e['engine_qps']:.2f}x",
            f"{e['naive']:.1f}",
            str(e["images"]),
        ],
    )


def memory_section(entries: list[dict[str, Any]]) -> list[str]:
    return measured_section(
        "Peak memory of `quench infer`",
        f"Peak resident set size of the whole `quench infer` process ({MEMORY_MODE} "
        "artifact), on the images above and on them repeated (symlinks).",
        ["images", "peak RSS MiB", "seconds", "images/s", "exit"],
        entries,
        "images",
        lambda e: [
            f"{e['peak_rss_kib'] / 1024:.0f}",
            f"{e['seconds']:.1f}",
            f"{e['images'] / e['seconds']:.1f}",
            str(e["rc"]),
        ],
    )


def builds_section(preps: list[Prep]) -> list[str]:
    if not preps:
        return []
    out = [
        "## Build / quantization times",
        "",
        "Wall time of the whole command (process start, reading calibration images, "
        "calibration, conversion, writing the result).",
        "",
        "| What | Family | Seconds | Notes |",
        "|---|---|---:|---|",
    ]
    for p in preps:
        note = f"**failed**: {p.error}" if p.error else p.detail
        out.append(f"| {p.label} | {p.family} | {fmt(p.seconds)} | {note.replace('|', '/')} |")
    return [*out, ""]


def how_measured(b: Bench, titles: dict[str, str]) -> list[str]:
    """How each figure was measured, then every command, row by row."""
    batches = b.batches
    out = [
        "## How measured",
        "",
        f"- Batch sizes {', '.join(map(str, batches))}; {b.args.duration:g} s per measurement; "
        f"all threads the process may use (no thread flags anywhere).",
        "- qps = images per second (batch x iterations / seconds).",
        "- `quench perf` (ONNX Runtime rows and Quench rows): one random batch, 20 untimed "
        "iterations, then synchronous back-to-back inference for the duration in 5 rounds "
        "that alternate between the batch sizes; p50/p99 over the per-iteration latencies. "
        "On an `.onnx` file it runs a plain "
        "`onnxruntime.InferenceSession(path)` with default session options.",
        "- `benchmark_app`: 3 runs of a third of the duration per batch size (its rounds); "
        "Throughput (FPS), their mean, parsed from its output; it counts images (checked: "
        "batch x count / duration). p50 is the median of its Medians; p99 comes from another "
        "run at "
        f"b={min(batches)} with `-latency_percentile 99`. With the throughput hint several "
        "requests are in flight, so its latency is per request under load.",
        "- % of peak = MACs per image x qps / peak MACs per second for the row's arithmetic "
        "(quench.perf.peak_macs, with the measured clock); Quench rows show `quench perf`'s own "
        "figure, peer rows the same formula applied here.",
        "- INT8 rows calibrate on the same images, read through the resnet50-v1-7 preset's "
        "preprocessing (quench.builder.calibration.load_calibration).",
        *[f"- {n}" for n in b.notes],
        "",
    ]
    for r in b.rows:
        out += [f"**{r.label}** ({titles[r.family]})", "", "```"]
        out += r.commands or ["(not run)"]
        out += ["```", ""]
    if b.preps:
        out += ["Model preparation:", "", "```", *[p.command for p in b.preps], "```", ""]
    return out


# -- one run --------------------------------------------------------------------------------


@dataclass
class Clock:
    """The reported clock, and the measured one (exported to every quench command)."""

    reported_ghz: float | None
    reported_how: str
    ghz: float | None
    how: str


@dataclass
class Built:
    """A Quench build of the replica: its row (timed later) and artifact (None: it failed)."""

    build: QuenchBuild
    row: Row
    artifact: Path | None


@dataclass
class Bench:
    """One run: its arguments, the command runner and everything measured so far."""

    args: argparse.Namespace
    runner: Runner
    src: Path  # the ResNet-50 replica
    rows: list[Row] = field(default_factory=list)
    preps: list[Prep] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the report's "How measured" extras
    built: list[Built] = field(default_factory=list)
    capped_titles: dict[str, str] = field(default_factory=dict)  # int8@CAP -> section title
    serving: list[dict[str, Any]] = field(default_factory=list)
    pipeline: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    accuracy: list[str] = field(default_factory=list)  # bench/accuracy.py's lines

    @property
    def work(self) -> Path:
        return self.args.work

    @property
    def batches(self) -> list[int]:
        return self.args.batch_list

    @property
    def families(self) -> list[str]:
        return self.args.families

    def perf(
        self,
        name: str,
        model: Path,
        out: Path,
        extra: list[str] | None = None,
        runner: Runner | None = None,
    ) -> tuple[Proc, dict[str, Any] | None]:
        """``quench perf`` at this run's batch sizes and duration."""
        runner = runner or self.runner
        return quench_perf(runner, name, model, out, self.batches, self.args.duration, extra)

    def benchmark_app(
        self, row: Row, model: Path, extra: list[str], runner: Runner | None = None
    ) -> dict[str, Any]:
        runner = runner or self.runner
        return run_benchmark_app(runner, row, model, extra, self.batches, self.args.duration)


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


def timed_quench_rows(b: Bench, modes: tuple[str, ...]) -> list[Row]:
    """The timed Quench rows (this CPU's, default configuration) of these modes."""
    return [r for r in b.rows if r.kind == "quench" and r.mode in modes and r.qps]


def serving_entries(b: Bench) -> list[dict[str, Any]]:
    """quench serve under 16 concurrent clients (bench/load.py) vs quench perf at batch 8."""
    entries: list[dict[str, Any]] = []
    if b.args.serve_duration <= 0:
        return entries
    for r in timed_quench_rows(b, SERVE_MODES):
        art = b.work / f"r50-{r.mode}.quench"
        cmd = [rel(Path(sys.executable)), rel(REPO / "bench" / "load.py"), rel(art)]
        cmd += ["--clients", "16", "--duration", f"{b.args.serve_duration:g}", "--warmup", "5"]
        cmd += ["--json"]
        say(f"quench serve load test {r.mode}")
        p = b.runner.run(f"serve-{r.mode}", cmd, b.args.serve_duration + 180)
        entry: dict[str, Any] = {"mode": r.mode, "command": p.cmd, "perf_b8": r.qps.get(8)}
        try:
            entry.update(json.loads(p.stdout))
        except ValueError:
            entry["error"] = p.error()
        entries.append(entry)
    return entries


def pipeline_entries(b: Bench) -> list[dict[str, Any]]:
    """End-to-end on real JPEGs: engine-only qps, pipeline and naive images/s, one command."""
    entries: list[dict[str, Any]] = []
    if not b.args.images.exists():
        b.notes.append(f"pipeline/memory skipped: {rel(b.args.images)} not found")
        return entries
    for r in timed_quench_rows(b, PIPELINE_MODES):
        art = b.work / f"r50-{r.mode}.quench"
        out = b.work / f"e2e-{r.mode}.json"
        out.unlink(missing_ok=True)
        cmd = [rel(QUENCH), "perf", rel(art), "--batch", "8", "--duration", f"{b.args.duration:g}"]
        cmd += ["--images", rel(b.args.images), "--json", rel(out), "-q"]
        say(f"end-to-end pipeline {r.mode}")
        p = b.runner.run(f"e2e-{r.mode}", cmd, 900)
        entry: dict[str, Any] = {"mode": r.mode, "command": p.cmd}
        try:
            doc = json.loads(out.read_text())
            e2e = doc["end_to_end"][0]
            entry.update(
                engine_qps=doc["results"][0]["qps"],
                pipeline=e2e["pipeline"]["images_per_s"],
                naive=e2e["naive_loop"]["images_per_s"],
                images=e2e["images"],
            )
        except (OSError, ValueError, KeyError, IndexError):
            entry["error"] = p.error()
        entries.append(entry)
    return entries


def memory_entries(b: Bench) -> list[dict[str, Any]]:
    """Peak RSS of quench infer on --images, and on them repeated to --memory-images."""
    entries: list[dict[str, Any]] = []
    art = b.work / f"r50-{MEMORY_MODE}.quench"
    if not (b.args.images.exists() and b.args.memory_images > 0 and art.exists()):
        return entries
    files = list_images(b.args.images)
    for count in sorted({len(files), b.args.memory_images}):
        folder = b.work / f"images-{count}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        for i in range(count):
            image = files[i % len(files)].absolute()
            (folder / f"{i:06d}-{image.name}").symlink_to(image)
        infer = [rel(QUENCH), "infer", rel(art), rel(folder), "-q"]
        infer += ["-o", rel(b.work / f"infer-{count}.jsonl")]
        cmd = [rel(Path(sys.executable)), rel(REPO / "bench" / "run.py"), "--step", "rss"]
        cmd += ["--cmd", json.dumps(infer)]
        say(f"peak memory of quench infer on {count} images")
        p = b.runner.run(f"rss-{count}", cmd, 60 + count)
        entry: dict[str, Any] = {"images": count, "command": shlex.join(infer)}
        try:
            entry.update(json.loads(p.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            entry["error"] = p.error()
        entries.append(entry)
        shutil.rmtree(folder)
    return entries


def accuracy_lines(b: Bench) -> list[str]:
    """bench/accuracy.py's table (INT8 top-1 on real models per CPU class), when asked for."""
    if not b.args.accuracy:
        return []
    md = b.work / "accuracy.md"
    md.unlink(missing_ok=True)
    cmd = [rel(Path(sys.executable)), rel(REPO / "bench" / "accuracy.py")]
    cmd += ["--caps", ",".join(b.args.isa_caps), "--work", rel(b.work / "accuracy")]
    cmd += ["--json", rel(b.work / "accuracy.json"), "--md", rel(md)]
    say("INT8 accuracy per CPU class (bench/accuracy.py)")
    p = b.runner.run("accuracy", cmd, 7200)
    if p.ok and md.exists():
        return [*md.read_text().splitlines(), "", "```", p.cmd, "```"]
    return [f"**failed**: {p.error()}", "", "```", p.cmd, "```"]


def peer_peak_shares(rows: list[Row], macs: int | None, threads: int) -> None:
    """Share of peak for the peer rows: the same formula quench perf uses for its own."""
    for r in rows:
        if r.kind == "peer" and macs and "@" not in r.family:
            compute = r.compute if r.compute != "?" else FAMILY_COMPUTE[r.family]
            peak, _ = peak_macs(compute, threads)
            # a share above 100% means the peak is wrong: never shown (quench perf's rule)
            r.peak = {b: macs * q / peak for b, q in r.qps.items() if macs * q <= peak}


def machine_table(
    clock: Clock, macs: int | None, threads: int, ov_default: str, load_start: str
) -> list[tuple[str, str]]:
    """The report's Machine section."""
    info = cpu_info()
    peaks = []
    for c in ("float32", "bfloat16", "float16", "int8"):
        v, how = peak_macs(c, threads)
        peaks.append(f"{c}: {v / 1e9:,.0f} GMAC/s ({how})")
    cpuinfo = cpuinfo_fields()
    return [
        ("CPU", f"{info.get('model')} ({info.get('vendor')}, family {info.get('family')})"),
        ("ISA flags", ", ".join(info.get("flags", [])) or "none of interest"),
        (
            "Cores",
            f"{threads} usable by this process; {os.cpu_count()} logical CPUs; "
            f"cpuinfo 'cpu cores' {cpuinfo.get('cpu cores') or '?'}, "
            f"siblings {cpuinfo.get('siblings') or '?'}",
        ),
        ("RAM", ram_gib()),
        ("OS", os_name()),
        ("Python", f"{platform.python_version()} ({rel(sys.executable)})"),
        (
            "Packages",
            f"onnxruntime {version('onnxruntime')}, openvino {version('openvino')}, "
            f"nncf {version('nncf')}, onnx {version('onnx')}, numpy {version('numpy')}, "
            f"quench {version('quench')} (git {git_rev()})",
        ),
        ("Reported clock", f"{fmt(clock.reported_ghz, 3)} GHz ({clock.reported_how})"),
        ("Measured clock", f"{fmt(clock.ghz, 3)} GHz: {clock.how}"),
        (
            "Clock used for % of peak",
            f"{fmt(clock.ghz or clock.reported_ghz, 3)} GHz"
            + (" (QUENCH_CPU_CLOCK_GHZ, exported to every quench command)" if clock.ghz else ""),
        ),
        ("Peak MAC rates", "; ".join(peaks)),
        ("MACs per image", f"{macs:,}" if macs else "unknown"),
        ("OpenVINO CPU default inference precision", str(ov_default)),
        ("Load average (1/5/15 min)", f"start {load_start}; end {loadavg()}"),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,4,8", help="Batch sizes, comma separated.")
    ap.add_argument("--duration", type=float, default=10.0, help="Seconds per measurement.")
    ap.add_argument("--calib-images", type=Path, default=DEFAULT_CALIB, help="INT8 calibration.")
    ap.add_argument("--calib-count", type=int, default=200)
    ap.add_argument("--work", type=Path, default=REPO / "bench" / "work", help="Scratch dir.")
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--only", default="fp32,bf16,int8", help="Families: fp32,bf16,int8.")
    ap.add_argument(
        "--serve-duration",
        type=float,
        default=60.0,
        help="Seconds of the quench serve load test (16 clients) per artifact; 0 skips it.",
    )
    ap.add_argument(
        "--images",
        type=Path,
        default=DEFAULT_VAL,
        help="JPEGs for the end-to-end pipeline and memory measurements (folder or list).",
    )
    ap.add_argument(
        "--memory-images",
        type=int,
        default=10000,
        help="Images (--images repeated) for the peak-memory run of quench infer; 0 skips it.",
    )
    ap.add_argument(
        "--isa-caps",
        default="",
        help="Also run the INT8 rows with OpenVINO capped at these ONEDNN_MAX_CPU_ISA values "
        "(comma separated, e.g. AVX2,AVX512_CORE): the same artifacts on older CPU classes.",
    )
    ap.add_argument(
        "--accuracy",
        action="store_true",
        help="Also run bench/accuracy.py (INT8 top-1 on real models per CPU class, --isa-caps).",
    )
    ap.add_argument("--step", choices=("ort-int8", "nncf-int8", "rss"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--cmd", help=argparse.SUPPRESS)
    ap.add_argument("--dest", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.batch_list = sorted({int(v) for v in args.batches.split(",") if v.strip()})
    except ValueError:
        ap.error(f"--batches takes sizes like 1,4,8, got {args.batches!r}")
    if not args.batch_list or min(args.batch_list) < 1:
        ap.error("--batches takes sizes >= 1")
    fams = {FAMILY_ALIASES.get(v.strip().lower()) for v in args.only.split(",") if v.strip()}
    if None in fams or not fams:
        ap.error(f"--only takes fp32,bf16,int8, got {args.only!r}")
    args.families = [f for f in FAMILIES if f in fams]
    if args.duration <= 0 or args.calib_count < 1:
        ap.error("--duration must be > 0 and --calib-count >= 1")
    args.isa_caps = [v.strip().upper() for v in args.isa_caps.split(",") if v.strip()]
    args.work = args.work.absolute()
    args.out = args.out.absolute()
    args.calib_images = args.calib_images.absolute()
    args.images = args.images.absolute()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        return STEPS[args.step](args)
    started = datetime.now(timezone.utc)
    args.work.mkdir(parents=True, exist_ok=True)
    say(
        f"work dir {args.work}; families {','.join(args.families)}; batches {args.batch_list}; "
        f"{args.duration:g} s each"
    )
    load_start = loadavg()
    env = dict(os.environ)
    clock = measure_machine_clock(args, env)
    b = Bench(args, Runner(args.work, env), args.work / "resnet50-replica.onnx")
    macs = make_replica(b)
    ov_default = openvino_default_precision()
    # Quench builds first, so that below each family's Quench timings follow its peers' with
    # nothing in between (this machine's speed drifts by several percent over minutes)
    b.built = [build_quench(b, q) for q in QUENCH_BUILDS if q.family in b.families]
    if "fp32" in b.families:
        ort_fp32_row(b)
    for group in ("fp32", "bf16"):
        benchmark_app_rows(b, group, ov_default)
        quench_rows(b, group)
    if "int8" in b.families:
        ort_int8_row(b)
        nncf_int8_rows(b)
    quench_rows(b, "int8")
    for cap in args.isa_caps if "int8" in b.families else []:
        capped_rows(b, cap)
    b.serving = serving_entries(b)
    b.pipeline = pipeline_entries(b)
    b.memory = memory_entries(b)
    b.accuracy = accuracy_lines(b)
    threads = default_threads()
    peer_peak_shares(b.rows, macs, threads)
    machine = machine_table(clock, macs, threads, ov_default, load_start)
    results = {"rows": [r.__dict__ for r in b.rows], "preps": [p.__dict__ for p in b.preps]}
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_report(b, machine, started)
    say(f"wrote {args.out}")
    return 0


STEPS: dict[str, Callable[[argparse.Namespace], int]] = {
    "ort-int8": ort_int8_step,
    "nncf-int8": nncf_int8_step,
    "rss": rss_step,
}

if __name__ == "__main__":
    sys.exit(main())
