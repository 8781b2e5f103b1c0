#!/usr/bin/env python3
"""Server RSS under worst-case ``/classify`` uploads (loopback, bounded).

Starts ``quench serve ARTIFACT`` on a free port, measures its idle RSS, then for each kind of
worst-case image (just under the server's decoded-pixel limit: a palette PNG, a grayscale PNG,
a 16-bit PNG, an RGB PNG, and the issue's 9400x9400 PNG which is refused) sends ``--clients``
concurrent uploads and samples the server's RSS every 20 ms. Reports the peak and the RSS a few
seconds after the last answer; fails when the peak is over ``--max-peak-mb``, the RSS does
not come back within 10% of the idle level, or an answer is other than 200, 400 (the refused
image) or 504 (its deadline passed while it waited for a decode slot, on a busy CPU).

    .venv/bin/python bench/memory.py model.quench --clients 16
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from common import free_port, stop, wait_ready
from PIL import Image


def worst_case_images(folder: Path, mpix: float) -> dict[str, bytes]:
    """Compressible images of just under ``mpix`` megapixels in the costliest modes."""
    side = int((mpix * 1e6) ** 0.5) - 8
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    grad = np.add.outer(ramp, ramp) / 2
    out: dict[str, bytes] = {}
    kinds = {
        "palette": Image.fromarray(grad.astype(np.uint8)).convert("P"),
        "gray": Image.fromarray(grad.astype(np.uint8)),
        "gray16": Image.fromarray((grad * 257).astype(np.uint16)),
        "rgb": Image.fromarray(np.dstack([grad.astype(np.uint8)] * 3)),
        "refused 9400x9400": Image.new("L", (9400, 9400), 7),
    }
    for name, im in kinds.items():
        path = folder / f"{name.split()[0]}.png"
        im.save(path, compress_level=1)
        out[f"{name} {im.size[0]}x{im.size[1]} ({path.stat().st_size // 1024} KB)"] = (
            path.read_bytes()
        )
    return out


def upload(port: int, model: str, data: bytes, codes: list[int]) -> None:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        c.request("POST", f"/v2/models/{model}/classify", data)
        r = c.getresponse()
        r.read()
        codes.append(r.status)
    except (OSError, http.client.HTTPException) as exc:
        codes.append(-1)
        print(f"  client error: {exc!r}", file=sys.stderr)
    finally:
        c.close()


def burst(
    port: int, model: str, data: bytes, n: int, proc: psutil.Process
) -> tuple[list[int], float]:
    """n concurrent uploads of ``data``: their statuses and the server's peak RSS (MB)."""
    codes: list[int] = []
    peak = rss_mb(proc)
    threads = [threading.Thread(target=upload, args=(port, model, data, codes)) for _ in range(n)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(proc))
        time.sleep(0.02)
    return codes, peak


def rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def settle(proc: psutil.Process, seconds: float) -> float:
    time.sleep(seconds)
    return rss_mb(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-image-mpix", type=float, default=40.0, help="the server's default")
    ap.add_argument("--max-peak-mb", type=float, default=1536.0)
    a = ap.parse_args()
    if not 1 <= a.clients <= 64:
        ap.error("--clients in 1..64")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "quench", "serve", a.artifact, "--port", str(port), "--quiet"]
    server = subprocess.Popen(cmd)
    proc = psutil.Process(server.pid)
    failed = False
    try:
        wait_ready(base, timeout=300)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", "/v2/repository/index", b"{}")
        model = json.loads(c.getresponse().read())[0]["name"]
        c.close()
        with tempfile.TemporaryDirectory() as tmp:
            images = worst_case_images(Path(tmp), a.max_image_mpix * 0.99)
        small = Image.new("RGB", (64, 48), (90, 120, 150))
        with tempfile.TemporaryDirectory() as tmp:
            small.save(Path(tmp) / "w.png")
            warm = (Path(tmp) / "w.png").read_bytes()
        for _ in range(3):  # threads, caches and every engine batch size exist before "idle"
            burst(port, model, warm, a.clients, proc)
        idle = settle(proc, 2.0)
        print(f"idle RSS {idle:.0f} MB")
        for name, data in images.items():
            codes, peak = burst(port, model, data, a.clients, proc)
            # a decode whose request timed out (504) still finishes: wait up to 30 s for it
            t0 = time.monotonic()
            after = settle(proc, 3.0)
            while after > idle * 1.1 and time.monotonic() - t0 < 30:
                after = settle(proc, 0.5)
            ok = peak <= a.max_peak_mb and after <= idle * 1.1
            # 504: the request's deadline passed while it waited for a decode slot (a busy CPU)
            failed |= not ok or any(code not in (200, 400, 504) for code in codes)
            print(
                f"{name}: {a.clients} uploads -> {sorted(set(codes))}; peak RSS {peak:.0f} MB, "
                f"{after:.0f} MB {time.monotonic() - t0:.0f} s later ({after / idle:.2f}x idle)"
                f"{'' if ok else '  FAIL'}",
                flush=True,
            )
    finally:
        stop(server, 60)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
