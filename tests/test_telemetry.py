"""Quench lets no dependency send usage data: a build starts no telemetry sender."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Run as a user would: not in CI (OpenVINO's telemetry skips CI runs by itself), with a fresh
# home, and count every process the build forks (the telemetry sender is a
# multiprocessing.Process) and every file OpenVINO's telemetry would write under the home.
# OpenVINO imported first (a Python user's order): its import already queued an event, so what
# counts is that nothing is handed to its sender once Quench is imported.
OPENVINO_FIRST = r"""
import openvino
import openvino_telemetry.utils.sender as sender
_send = sender.TelemetrySender.send
def send(self, *args, **kwargs):
    sent.append(1)
    return _send(self, *args, **kwargs)
sender.TelemetrySender.send = send
"""
SCRIPT = r"""
import json, multiprocessing, sys
started, sent = [], []
_start = multiprocessing.Process.start
def start(self):
    started.append(getattr(self, "_target", None).__qualname__)
    return _start(self)
multiprocessing.Process.start = start
import quench
quench.build(
    sys.argv[1], sys.argv[2], labels=sys.argv[3], preset="imagenet", resize=36, crop=32,
    engine="openvino",
)
import openvino.tools.ovc.convert_impl as ci
from quench.telemetry import opted_out
doc = {"started": started, "sent": sent, "stub": ci.tm.__name__, "opted_out": opted_out()}
print(json.dumps(doc))
"""


@pytest.mark.parametrize("openvino_first", [False, True])
def test_build_sends_no_telemetry(
    tiny_model: Path, tiny_labels: Path, tmp_path: Path, openvino_first: bool
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    env.update(HOME=str(home), QUENCH_CACHE=str(tmp_path / "cache"))
    script = SCRIPT.replace(
        "import quench\n", (OPENVINO_FIRST if openvino_first else "") + "import quench\n"
    )
    out = tmp_path / "m.quench"
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model), str(out), str(tiny_labels)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["sent"] == [] and doc["opted_out"]
    if not openvino_first:
        assert doc["started"] == []  # no sender process
        assert doc["stub"] == "openvino.tools.ovc.telemetry_stub"
        assert not (home / "intel").exists()  # no consent file, client id or usage stats
    assert out.is_file()
