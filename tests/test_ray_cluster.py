"""End to end on a two-node Ray cluster made on this machine (``ray start --head`` plus
``ray start --address``, one CPU each, token authentication): ``quench infer --ray`` and
``quench serve --ray`` as a user runs them, in their own processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from quench.model import Model
from raycluster import two_nodes
from test_ray import assert_equal_to_local, read_rows

pytestmark = pytest.mark.skipif(
    find_spec("ray") is None, reason='Ray is not installed: pip install "quench[ray]"'
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """(address, environment of a client) of a head and a worker node, torn down after."""
    with two_nodes() as found:
        yield found


def quench(*args: str, env: dict[str, str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quench", *args], env=env, capture_output=True, text=True, **kw
    )


def test_batch_on_two_nodes_equals_local(
    cluster: tuple[str, dict[str, str]], tiny_artifact: Path, image_dir: Path, tmp_path: Path
) -> None:
    address, env = cluster
    out = tmp_path / "results"
    args = ["infer", str(tiny_artifact), str(image_dir), "--ray", address, "-o", str(out)]
    run = quench(*args, "--json", "-q", env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    # two actors of 0.75 CPU cannot share a 1-CPU node: one ran on each
    assert (summary["actors"], summary["ok"], summary["failed"]) == (2, 7, 0)
    rows = read_rows(out)
    assert len(rows) == 7
    assert_equal_to_local(rows, tiny_artifact)


def test_serve_on_two_nodes(
    cluster: tuple[str, dict[str, str]], tiny_artifact: Path, tmp_path: Path
) -> None:
    from tritonclient import http as triton

    from test_serve import free_port, wait_ready

    address, env = cluster
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    cmd = ["serve", str(tiny_artifact), "--ray", address, "--replicas", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "quench", *cmd, "--port", str(port), "--name", "tiny", "-q"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=300)
        x = np.random.default_rng(7).standard_normal((5, 3, 32, 32)).astype(np.float32)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}", concurrency=4)
        inp = triton.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        pending = [client.async_infer("tiny", [inp]) for _ in range(8)]
        with Model.load(tiny_artifact) as m:
            expected = m.predict(x)
        for p in pending:
            np.testing.assert_allclose(p.get_result().as_numpy("logits"), expected, atol=1e-5)
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0  # graceful: the app deleted, then exit 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "with Ray Serve, 2 replica(s)" in text, text[-3000:]
