#!/usr/bin/env python3
"""Load generator for ``quench serve``, over HTTP and gRPC, against ``quench perf`` (loopback).

N client threads, each with its own keep-alive connection (``http.client``, or a gRPC channel of
its own), send v2 infer requests (binary tensors: HTTP's binary tensor data extension, gRPC's
``raw_input_contents``; random FP32 input) for D seconds and report throughput, latency
p50/p90/p99 and failures per protocol.

Given artifacts, for each one it times ``quench perf --batch B`` (B: the server's ``--max-batch``,
8 by default), starts ``quench serve`` with both listeners on free ports, loads it over each
protocol in turn, stops it (SIGTERM: exit code 0 expected), times ``quench perf`` again, and
gives each protocol's images/s as a multiple of the mean of the two perf figures. ``--md``
writes the table into BENCHMARKS.md (between its markers):

    .venv/bin/python bench/load.py r50-fp32.quench r50-int8.quench --duration 60 --md BENCHMARKS.md

Or point it at a running server (no perf comparison):

    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --grpc 127.0.0.1:8001 --duration 10

``--mixed`` (one artifact): valid and hostile HTTP traffic, then SIGTERM (see ``mixed.py``):

    .venv/bin/python bench/load.py model.quench --mixed --clients 16 --duration 60
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    LOOPBACK,
    free_port,
    get_json,
    get_json_index,
    make_request,
    random_input,
    stop,
    wait_ready,
    write_section,
)

MARK = "<!-- load -->"
INFER = "/inference.GRPCInferenceService/ModelInfer"
LAT = (("p50", 50), ("p90", 90), ("p99", 99))
Result = tuple[list[float], list[str]]  # latencies (s) of answered requests, failures


# -- clients ----------------------------------------------------------------------------------
def http_client(target: tuple, until: float, lat: list[float], errors: list[str]) -> None:
    host, port, path, body, headers = target
    conn = http.client.HTTPConnection(host, port, timeout=60)
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body, headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                lat.append(time.perf_counter() - t0)
            else:
                errors.append(str(resp.status))
        except (OSError, http.client.HTTPException) as exc:
            errors.append(type(exc).__name__)
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
            time.sleep(0.01)
    conn.close()


def grpc_client(target: tuple, until: float, lat: list[float], errors: list[str]) -> None:
    import grpc

    address, data = target
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:  # a connection of its own
        rpc = channel.unary_unary(INFER)
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            try:
                rpc(data, timeout=60)
                lat.append(time.perf_counter() - t0)
            except grpc.RpcError as exc:
                errors.append(exc.code().name)
                time.sleep(0.01)


def grpc_request(meta: dict, model: str, batch: int, seed: int) -> bytes:
    from tritonclient.grpc import service_pb2 as pb

    name, shape, x = random_input(meta, batch, seed)
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=shape)
    req = pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x])
    return req.SerializeToString()


def run_clients(client: Callable[..., None], target: tuple, n: int, seconds: float) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    until = t0 + seconds
    threads = [threading.Thread(target=client, args=(target, until, lat, errors)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000 if lat else np.zeros(1)
    return {
        "seconds": round(elapsed, 2),
        "requests": len(lat),
        "failed": len(errors),
        "failures": sorted(set(errors)),
        "requests_per_s": round(len(lat) / elapsed, 1),
        "latency_ms": {p: round(float(np.percentile(ms, q)), 2) for p, q in LAT},
    }


def load(
    base: str, grpc_at: str | None, model: str | None, protocols: list[str], a: argparse.Namespace
) -> tuple[str, dict[str, dict]]:
    """Each protocol's figures against the server at ``base`` (HTTP) and ``grpc_at``."""
    name = model or get_json_index(base)[0]["name"]
    meta = get_json(base, f"/v2/models/{name}")
    u = urllib.parse.urlsplit(base)
    targets: dict[str, tuple[Callable[..., None], tuple]] = {}
    if "http" in protocols:
        body, headers = make_request(meta, a.batch_per_request, 0)
        path = f"/v2/models/{name}/infer"
        targets["http"] = (http_client, (u.hostname, u.port, path, body, headers))
    if "grpc" in protocols and grpc_at:
        data = grpc_request(meta, name, a.batch_per_request, 0)
        targets["grpc"] = (grpc_client, (grpc_at, data))
    out = {}
    for kind in a.client.split(","):
        for proto, (client, target) in targets.items():
            if a.warmup > 0:
                run_clients(client, target, a.clients, a.warmup)
            if kind == "native":
                res = _native(proto, target, a)
            else:
                res = run_clients(client, target, a.clients, a.duration)
            res["images_per_s"] = round(res["requests_per_s"] * a.batch_per_request, 1)
            out[proto if kind == "python" else f"{proto} ({res['client']})"] = res
    return name, out


def _native(proto: str, target: tuple, a: argparse.Namespace) -> dict:
    """``wrk`` (HTTP) or ``h2load`` (gRPC) with the same request (see ``native_load.py``); the
    Python warm-up before it has checked that the server answers that request."""
    import native_load

    if proto == "http":
        host, port, path, body, headers = target
        return native_load.wrk(host, port, path, body, headers, a.clients, a.duration)
    address, data = target
    return native_load.h2load(address, INFER, data, a.clients, a.duration)


# -- against quench perf ----------------------------------------------------------------------
def perf(artifact: str, batch: int, seconds: float) -> dict:
    """``quench perf ARTIFACT --batch B``: its result row and the machine."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "perf.json"
        cmd = [sys.executable, "-m", "quench", "perf", artifact, "--batch", str(batch)]
        cmd += ["--duration", f"{seconds:g}", "--json", str(out), "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"error: {' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        doc = json.loads(out.read_text())
    row = doc["results"][0]
    return {
        "qps": row["qps"],
        "model": row["model"],
        "precision": row["precision"],
        "engine": row["engine"],
        "threads": row["threads"],
        "warnings": row.get("warnings", []),
        "machine": doc["machine"],
    }


def serve_and_load(artifact: str, batch: int, protocols: list[str], a: argparse.Namespace) -> dict:
    before = perf(artifact, batch, a.perf_duration)
    port, gport = free_port(), free_port()
    cmd = [sys.executable, "-m", "quench", "serve", artifact, "--port", str(port), "--quiet"]
    cmd += ["--max-batch", str(batch)]
    if "grpc" in protocols:
        cmd += ["--grpc-port", str(gport)]
    proc = subprocess.Popen(cmd + a.serve_args.split())
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=300)
        name, res = load(base, f"127.0.0.1:{gport}", a.model, protocols, a)
    finally:
        stop(proc)
    after = perf(artifact, batch, a.perf_duration)
    engine = (before["qps"] + after["qps"]) / 2
    for r in res.values():
        r["vs_perf"] = round(r["images_per_s"] / engine, 3)
    return {
        "artifact": artifact,
        "model": name,
        "precision": before["precision"],
        "engine": f"{before['engine']}, {before['threads']} threads",
        "batch": batch,
        "perf_images_per_s": {"before": before["qps"], "after": after["qps"]},
        "served": res,
        "server_exit": proc.returncode,
        "warnings": sorted(set(before["warnings"] + after["warnings"])),
        "machine": before["machine"],
    }


def _clients(a: argparse.Namespace) -> str:
    kinds = {
        "python": "Python threads: `http.client`, `grpcio`",
        "native": "native: `wrk` for HTTP/1.1, `h2load` for gRPC over HTTP/2; protocol rows "
        "marked with the tool",
    }
    return "; ".join(kinds[k] for k in a.client.split(","))


def section(rows: list[dict], a: argparse.Namespace, argv: list[str]) -> str:
    m = rows[0]["machine"]
    machine = f"{m['model']} ({m['cores']} cores, {m['clock_ghz']} GHz; {', '.join(m['flags'])})"
    lines = [
        MARK,
        "## Serving: `quench serve` under load (HTTP and gRPC)",
        "",
        f"{a.clients} concurrent clients on loopback ({_clients(a)}), "
        f"{a.batch_per_request} image(s) per request "
        "(binary tensors: HTTP's binary tensor data extension, gRPC's `raw_input_contents`), "
        f"{a.duration:g} s per protocol, dynamic batching up to the batch shown; against "
        "`quench perf` at that batch on the same artifact (the mean of a run before and one "
        f"after the server's). Machine: {machine}. "
        f"{datetime.date.today().isoformat()}.",
        "",
        "| Model | Quant_Mode | engine | batch | quench perf images/s | protocol | images/s served "
        "| served / perf | p50 ms | p99 ms | failed | server exit |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["perf_images_per_s"]
        for proto, s in r["served"].items():
            lines.append(
                f"| {r['model']} | {r['precision']} | {r['engine']} | {r['batch']} "
                f"| {(p['before'] + p['after']) / 2:.1f} ({p['before']:.1f} / {p['after']:.1f}) "
                f"| {proto} | {s['images_per_s']:.1f} | {s['vs_perf']:.2f}x "
                f"| {_ms(s, 'p50')} | {_ms(s, 'p99')} | {s['failed']} "
                f"| {r['server_exit']} |"
            )
    warnings = sorted({w for r in rows for w in r["warnings"]})
    if warnings:
        lines += ["", *(f"> warning (quench perf): {w}" for w in warnings)]
    lines += ["", "```", ".venv/bin/python bench/load.py " + " ".join(argv), "```", MARK]
    return "\n".join(lines) + "\n"


def _ms(s: dict, p: str) -> str:
    """A latency cell; h2load gives only the mean, shown for p50 (marked), no p99."""
    lat = s["latency_ms"]
    if p in lat:
        return f"{lat[p]:.1f}"
    return f"{lat['mean']:.1f} (mean)" if p == "p50" and "mean" in lat else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("artifacts", nargs="*", help="start `quench serve` on each artifact in turn")
    ap.add_argument("--url", help="a running server's HTTP address instead (loopback only)")
    ap.add_argument("--grpc", help="with --url: its gRPC address, HOST:PORT (loopback only)")
    ap.add_argument("--model", help="model name (default: the first in the repository index)")
    ap.add_argument("--protocols", default="http,grpc", help="http, grpc or both (default)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument(
        "--client",
        default="python",
        help="python (threads: http.client, grpcio), native (wrk, h2load) or python,native",
    )
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per protocol (max 600)")
    ap.add_argument("--perf-duration", type=float, help="seconds of each quench perf run")
    ap.add_argument("--batch", type=int, default=8, help="the server's --max-batch and perf's")
    ap.add_argument("--batch-per-request", type=int, default=1)
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds per protocol, not counted")
    ap.add_argument("--serve-args", default="", help="extra `quench serve` options")
    ap.add_argument("--md", type=Path, help="write the table into this BENCHMARKS.md")
    ap.add_argument("--min-ratio", type=float, help="exit 1 when served / perf is below this")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--mixed", action="store_true", help="valid + malformed traffic, SIGTERM")
    a = ap.parse_args()
    protocols = [p for p in a.protocols.split(",") if p]
    if bool(a.artifacts) == bool(a.url):
        ap.error("give artifacts or --url, not both")
    if not 0 < a.duration <= 600 or a.clients < 1 or a.batch_per_request < 1 or a.batch < 1:
        ap.error("--duration in (0, 600], --clients, --batch, --batch-per-request >= 1")
    if not protocols or set(protocols) - {"http", "grpc"}:
        ap.error("--protocols: http, grpc or http,grpc")
    a.perf_duration = a.perf_duration or min(a.duration, 30.0)
    kinds = a.client.split(",")
    if not kinds or set(kinds) - {"python", "native"}:
        ap.error("--client: python, native or python,native")
    if "native" in kinds:
        import native_load

        if why := native_load.available():
            ap.error(f"--client native: {why}")
    if a.mixed:
        if len(a.artifacts) != 1:
            ap.error("--mixed starts the server itself: give one artifact")
        from mixed import run_mixed

        return run_mixed(a.artifacts[0], a.clients, a.duration, a.serve_args.split())
    if a.url:
        return _against_url(ap, a, protocols)
    rows = [serve_and_load(art, a.batch, protocols, a) for art in a.artifacts]
    for r in rows:
        _print(r["model"], r["precision"], r["served"], a, r)
    if a.json:
        print(json.dumps(rows))
    if a.md:
        write_section(a.md, MARK, section(rows, a, sys.argv[1:]))
    return _verdict(rows, a)


def _against_url(ap: argparse.ArgumentParser, a: argparse.Namespace, protocols: list[str]) -> int:
    base = a.url.rstrip("/")
    hosts = [urllib.parse.urlsplit(base).hostname]
    if a.grpc:
        hosts.append(a.grpc.rpartition(":")[0].strip("[]"))
    if any(h not in LOOPBACK for h in hosts):
        ap.error("--url and --grpc must be loopback addresses")
    if "grpc" in protocols and not a.grpc:
        protocols = [p for p in protocols if p != "grpc"]
    wait_ready(base)
    name, res = load(base, a.grpc, a.model, protocols, a)
    _print(name, None, res, a, None)
    if a.json:
        print(json.dumps({"model": name, "served": res}))
    return _verdict([{"served": res, "server_exit": 0}], a)


def _print(name: str, precision: Any, res: dict, a: argparse.Namespace, row: Any) -> None:
    for proto, r in res.items():
        vs = f", {r['vs_perf']:.2f}x quench perf" if "vs_perf" in r else ""
        print(
            f"{name}{f' {precision}' if precision else ''} {proto}: {a.clients} clients x "
            f"batch {a.batch_per_request}, {r['seconds']:.1f} s: {r['images_per_s']} img/s{vs}, "
            f"p50 {r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms, "
            f"failed {r['failed']} {r['failures'] or ''}"
        )
    if row is not None:
        p = row["perf_images_per_s"]
        print(f"  quench perf batch {row['batch']}: {p['before']} img/s before, {p['after']} after")


def _verdict(rows: list[dict], a: argparse.Namespace) -> int:
    served = [s for r in rows for s in r["served"].values()]
    bad = any(s["failed"] or not s["requests"] for s in served)
    bad |= any(r["server_exit"] != 0 for r in rows)
    if a.min_ratio is not None:
        bad |= any(s.get("vs_perf", 0) < a.min_ratio for s in served)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
