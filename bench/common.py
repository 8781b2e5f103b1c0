"""What the bench scripts share: running ``quench`` as a user does, talking to a local
``quench serve`` (ports, readiness, v2 requests), and writing their section of BENCHMARKS.md
between their own markers (the rest of the file kept as it is)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def timed_quench(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """``quench ARGS`` in its own process, timed as a whole command: (seconds, the result)."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "quench", *args], env=env, capture_output=True, text=True
    )
    return time.perf_counter() - t0, done


def write_section(md: Path, mark: str, section: str) -> None:
    """Put ``section`` (which starts and ends with ``mark``) in ``md`` in place of the one
    between the same markers, or at the end."""
    text = md.read_text() if md.exists() else ""
    if mark in text:
        head, _, rest = text.partition(mark)
        _, _, tail = rest.partition(mark)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md.write_text(text)


# -- a local quench serve -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, path: str) -> object:
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return json.loads(r.read())


def get_json_index(base: str) -> list[dict]:
    req = urllib.request.Request(f"{base}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
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


def random_input(meta: dict, batch: int, seed: int) -> tuple[str, list[int], bytes]:
    """The model's input name, a shape of ``batch`` images and random little-endian FP32."""
    inp = meta["inputs"][0]
    shape = [batch, *(int(d) for d in inp["shape"][1:])]
    x = np.random.default_rng(seed).standard_normal(shape).astype("<f4").tobytes()
    return inp["name"], shape, x


def make_request(meta: dict, batch: int, seed: int) -> tuple[bytes, dict[str, str]]:
    """A v2 HTTP infer request with binary tensor data in and out: (body, headers)."""
    name, shape, x = random_input(meta, batch, seed)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
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


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the server; kill it if it has not exited within ``timeout`` s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def answers_by_status(base: str, method: str | None = None) -> dict[str, int]:
    """quench_requests_total summed by status (what the server itself answered); ``method``:
    only that method's (``GRPC``: the gRPC answers, by status code name)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("quench_requests_total{") and (
            method is None or f'method="{method}"' in line
        ):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            out[status] = out.get(status, 0) + int(float(line.split()[-1]))
    return out


def mutations(data: bytes, n: int, rng: np.random.Generator) -> Iterator[bytes]:
    """``n`` malformed variants of a valid message: bytes flipped, cut, spliced in, or random."""
    for i in range(n):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:
            for pos in rng.integers(0, len(b), rng.integers(1, 9)):
                b[pos] = int(rng.integers(0, 256))
        elif kind == 1:
            b = b[: int(rng.integers(0, len(b)))]
        elif kind == 2:
            pos = int(rng.integers(0, len(b)))
            b[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
        else:
            b = bytearray(rng.bytes(int(rng.integers(0, 256))))
        yield bytes(b)
