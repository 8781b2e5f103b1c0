"""bench/run.py's measurements beyond the tables: ``quench serve`` under load, the end-to-end
pipeline, the peak memory of ``quench infer``, bench/accuracy.py; the peers' share of peak and
the Machine section."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from common import REPO, fmt, git_rev, loadavg, os_name, ram_gib, rel, version

from quench.evaluate import list_images
from quench.hw import cpu_info, cpuinfo_fields
from quench.perf import peak_macs
from r50.config import (
    FAMILY_COMPUTE,
    MEMORY_MODE,
    PIPELINE_MODES,
    QUENCH,
    SERVE_MODES,
    Clock,
    Row,
    say,
)
from r50.measure import Bench


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
