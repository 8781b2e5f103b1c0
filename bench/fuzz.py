#!/usr/bin/env python3
"""Fuzz ``quench serve`` from its published OpenAPI description with schemathesis (loopback).

Starts ``quench serve ARTIFACT`` on a free port, runs ``schemathesis run`` on
``/openapi.json`` (every operation, positive and negative cases, every check but
``positive_data_acceptance``: which tensor names and shapes a model takes, and that ``data`` holds
as many numbers as ``shape`` says, are not expressible in the one schema of all models, so
schema-valid requests are rightly refused) and then reads the server's own count of answers by
status from ``/metrics``: the run fails when any answer was a 5xx or the server logged a
traceback. schemathesis is not a dependency of Quench: ``pip install schemathesis``.

    .venv/bin/python bench/fuzz.py model.quench --max-examples 150 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common import answers_by_status, free_port, wait_ready


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--max-examples", type=int, default=150, help="cases per operation")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--max-time", type=int, default=900, help="seconds (schemathesis budget)")
    a = ap.parse_args()
    st = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    if not Path(st).exists():
        ap.error("schemathesis is not installed: pip install schemathesis")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    quench = [sys.executable, "-m", "quench", "serve", a.artifact, "--port", str(port), "--quiet"]
    server = subprocess.Popen(quench, stderr=subprocess.PIPE, text=True)
    report = Path(tempfile.mkdtemp(prefix="quench-fuzz-"))
    try:
        wait_ready(base)
        cmd = [
            *(st, "run", f"{base}/openapi.json", "--checks", "all"),
            *("--exclude-checks", "positive_data_acceptance"),
            *("--max-examples", str(a.max_examples), "--seed", str(a.seed)),
            *("--workers", a.workers, "--max-time", str(a.max_time), "--no-color"),
            *("--generation-database", "none", "--request-timeout", "60"),
            *("--report", "junit", "--report-dir", str(report)),
        ]
        print("$", " ".join(cmd), flush=True)
        fuzz = subprocess.run(cmd, env={**os.environ, "NO_COLOR": "1"}, cwd=report)  # its cache
        counts = answers_by_status(base)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, err = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    total = sum(counts.values())
    errors = {s: n for s, n in counts.items() if s.startswith("5")}
    tracebacks = err.count("Traceback")
    print(
        json.dumps(
            {
                "requests": total,
                "by_status": dict(sorted(counts.items())),
                "server_errors": sum(errors.values()),
                "tracebacks": tracebacks,
                "schemathesis_exit": fuzz.returncode,
                "server_exit": server.returncode,
                "junit": str(report),
            }
        )
    )
    return 1 if errors or tracebacks or server.returncode != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
