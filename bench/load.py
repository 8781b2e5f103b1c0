#!/usr/bin/env python3
"""Load generator for ``quench serve`` (loopback only, bounded in time).

N client threads, each with its own keep-alive ``http.client`` connection, send v2 infer requests
(binary tensor data, random FP32 input) for D seconds and report throughput, latency p50/p90/p99
and failures. Either point it at a running server (``--url``) or give an artifact and it starts
``quench serve`` itself on a free port and stops it (SIGTERM) afterwards.

    .venv/bin/python bench/load.py model.quench --clients 16 --duration 60 --batch-per-request 1
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --model resnet50 --duration 10

``--mixed`` (artifact only): the clients send valid requests mixed with malformed, unparsable,
abandoned and oversized ones for D seconds, then again while the server gets SIGTERM. It checks
0 answers 5xx, 0 lost accepted requests (every answer in the server's access log reached its
client), exit code 0, and the server's RSS a few seconds after the traffic within 10% of its
RSS before it:

    .venv/bin/python bench/load.py model.quench --mixed --clients 16 --duration 60
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, path: str) -> object:
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return json.loads(r.read())


def wait_ready(base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"error: server at {base} not ready after {timeout:.0f} s")


def make_request(meta: dict, batch: int, seed: int) -> tuple[bytes, dict[str, str]]:
    inp = meta["inputs"][0]
    shape = [batch, *inp["shape"][1:]]
    x = np.random.default_rng(seed).standard_normal(shape).astype("<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": inp["name"],
                    "datatype": "FP32",
                    "shape": shape,
                    "parameters": {"binary_data_size": len(x)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + x, {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def client(
    host: str,
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    until: float,
    lat: list[float],
    errors: list[str],
) -> None:
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("artifact", nargs="?", help="start `quench serve` on this artifact")
    ap.add_argument("--url", help="a running server instead (loopback only)")
    ap.add_argument("--model", help="model name (default: the first in the repository index)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds (max 600)")
    ap.add_argument("--batch-per-request", type=int, default=1)
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds, not counted")
    ap.add_argument(
        "--serve-args", default="", help="extra `quench serve` options, e.g. '--max-batch 16'"
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--mixed", action="store_true", help="valid + malformed traffic, SIGTERM")
    a = ap.parse_args()
    if bool(a.artifact) == bool(a.url):
        ap.error("give an artifact or --url, not both")
    if not 0 < a.duration <= 600 or a.clients < 1 or a.batch_per_request < 1:
        ap.error("--duration in (0, 600], --clients >= 1, --batch-per-request >= 1")
    if a.mixed:
        if not a.artifact:
            ap.error("--mixed starts the server itself: give an artifact")
        from mixed import run_mixed

        return run_mixed(a.artifact, a.clients, a.duration, a.serve_args.split())

    proc = None
    if a.url:
        base = a.url.rstrip("/")
        if urllib.parse.urlsplit(base).hostname not in LOOPBACK:
            ap.error("--url must be a loopback address")
    else:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        quench = Path(sys.executable).with_name("quench")
        cmd = [str(quench), "serve", a.artifact, "--port", str(port), "--quiet"]
        proc = subprocess.Popen(cmd + a.serve_args.split())
    try:
        wait_ready(base)
        name = a.model or get_json_index(base)[0]["name"]
        meta = get_json(base, f"/v2/models/{name}")
        body, headers = make_request(meta, a.batch_per_request, 0)
        u = urllib.parse.urlsplit(base)
        path = f"/v2/models/{name}/infer"
        if a.warmup > 0:
            run_clients(u, path, body, headers, a.clients, a.warmup)
        lat, errors, elapsed = run_clients(u, path, body, headers, a.clients, a.duration)
    finally:
        if proc is not None:
            stop(proc)
    ms = np.asarray(lat) * 1000 if lat else np.zeros(1)
    res = {
        "model": name,
        "clients": a.clients,
        "batch_per_request": a.batch_per_request,
        "seconds": round(elapsed, 2),
        "requests": len(lat),
        "failed": len(errors),
        "requests_per_s": round(len(lat) / elapsed, 1),
        "images_per_s": round(len(lat) * a.batch_per_request / elapsed, 1),
        "latency_ms": {p: round(float(np.percentile(ms, q)), 2) for p, q in LAT},
        "server_exit": proc.returncode if proc is not None else None,
    }
    if a.json:
        print(json.dumps(res))
    else:
        print(
            f"{name}: {res['clients']} clients x batch {a.batch_per_request}, {elapsed:.1f} s: "
            f"{res['requests_per_s']} req/s, {res['images_per_s']} img/s, "
            f"p50 {res['latency_ms']['p50']} ms, p90 {res['latency_ms']['p90']} ms, "
            f"p99 {res['latency_ms']['p99']} ms, failed {len(errors)}"
        )
    return 1 if errors or not lat else 0


LAT = (("p50", 50), ("p90", 90), ("p99", 99))


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the server; kill it if it has not exited within ``timeout`` s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def get_json_index(base: str) -> list[dict]:
    req = urllib.request.Request(f"{base}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def run_clients(
    u: urllib.parse.SplitResult,
    path: str,
    body: bytes,
    headers: dict[str, str],
    n: int,
    seconds: float,
) -> tuple[list[float], list[str], float]:
    lat: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    until = t0 + seconds
    threads = [
        threading.Thread(
            target=client, args=(u.hostname, u.port, path, body, headers, until, lat, errors)
        )
        for _ in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errors, time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
