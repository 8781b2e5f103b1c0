"""Native load generators for ``bench/load.py --client native``: ``wrk`` (HTTP/1.1) and ``h2load``
(HTTP/2, here unary gRPC), both from Debian's packages (``apt-get install wrk nghttp2-client``).

On a 2-core machine the Python client threads of ``load.py`` spend about as much CPU per request
as the server does, so a fast model's served throughput is capped by its own load generator.
These C clients cost a few microseconds per request. Each returns the same figures as
``load.run_clients``: requests, failures, requests/s and latency percentiles (``h2load`` reports
min/mean/max, not percentiles: its mean stands in for p50, and p90/p99 are left out).

gRPC over ``h2load``: the body is the length-prefixed ``ModelInferRequest`` (gRPC's framing,
uncompressed), POSTed with ``content-type: application/grpc``. ``h2load`` counts HTTP statuses
only; a gRPC error travels in the trailers with HTTP 200, so ``load.py`` first sends the same
message through ``grpcio`` and checks the answer (:func:`check_grpc`).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

WRK_SCRIPT = """
local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "QUENCH-JSON {{\\"requests\\": %d, \\"us\\": %d, \\"status\\": %d, \\"connect\\": %d, "
    .. "\\"read\\": %d, \\"write\\": %d, \\"timeout\\": %d, \\"p50\\": %d, \\"p90\\": %d, "
    .. "\\"p99\\": %d}}\\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def available() -> str | None:
    """None when both tools are on PATH, else a one-line reason."""
    missing = [t for t in ("wrk", "h2load") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install wrk nghttp2-client)"
    return None


def wrk(
    host: str,
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    clients: int,
    seconds: float,
) -> dict:
    """``wrk`` with ``clients`` keep-alive connections on 2 threads for ``seconds``."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "body.bin"
        data.write_bytes(body)
        lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT.format(body=data, headers=lines))
        cmd = [
            "wrk",
            "-t",
            str(min(2, clients)),
            "-c",
            str(clients),
            "-d",
            f"{max(1, round(seconds))}s",
        ]
        cmd += ["--timeout", "60s", "-s", str(script), f"http://{host}:{port}{path}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"^QUENCH-JSON (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no summary: {out[-300:]!r}")
    d = json.loads(m.group(1))
    failed = sum(d[k] for k in ("status", "connect", "read", "write", "timeout"))
    failures = [f"{k}: {d[k]}" for k in ("status", "connect", "read", "write", "timeout") if d[k]]
    seconds_run = d["us"] / 1e6
    ok = d["requests"] - d["status"]  # wrk counts non-2xx answers among its requests
    return {
        "client": "wrk",
        "seconds": round(seconds_run, 2),
        "requests": ok,
        "failed": failed,
        "failures": failures,
        "requests_per_s": round(ok / seconds_run, 1),
        "latency_ms": {p: round(d[p] / 1000, 2) for p in ("p50", "p90", "p99")},
    }


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: flag 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def h2load(address: str, path: str, message: bytes, clients: int, seconds: float) -> dict:
    """``h2load`` POSTing the gRPC ``message`` on ``clients`` HTTP/2 connections, one stream
    each, for ``seconds``."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "body.bin"
        data.write_bytes(grpc_frame(message))
        cmd = ["h2load", "-c", str(clients), "-m", "1", "-t", str(min(2, clients))]
        cmd += ["-D", str(max(1, round(seconds))), "-d", str(data)]
        cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        cmd += [f"http://{address}{path}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        out,
    )
    fin = re.search(r"finished in ([\d.]+)(m?s)", out)
    lat = re.search(
        r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out
    )
    if not (req and fin and lat):
        raise RuntimeError(f"h2load printed no summary: {out[-300:]!r}")
    done, ok, failed, errored, timeout = (int(req.group(i)) for i in (3, 4, 5, 6, 7))
    secs = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    mean_ms = float(lat.group(5)) * scale[lat.group(6)]
    failures = [
        f"{k}: {v}"
        for k, v in (("failed", failed), ("errored", errored), ("timeout", timeout))
        if v
    ]
    return {
        "client": "h2load",
        "seconds": round(secs, 2),
        "requests": ok,
        "failed": failed + errored + timeout,
        "failures": failures,
        "requests_per_s": round(ok / secs, 1),
        "latency_ms": {"mean": round(mean_ms, 2)},
        "done": done,
    }
