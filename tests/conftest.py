"""Shared fixtures: a tiny generated classifier, its labels, an artifact and a few images."""

from __future__ import annotations

import hashlib
import json
import socket
import zipfile
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

# Quench opts out of OpenVINO's usage telemetry on import (quench.telemetry), before any test
# imports OpenVINO: its sender, forked from this many-threaded test process (Ray, the S3
# server's IO thread), could deadlock and keep the suite from exiting.
import quench  # noqa: F401 - the opt-out, before any test module imports OpenVINO

NUM_CLASSES = 10
SIZE = 32  # crop; resize is 36


def make_classifier(
    path: Path,
    batch: int | str = "N",
    size: int = SIZE,
    classes: int = NUM_CLASSES,
    seed: int = 0,
    input_name: str = "images",
    output_name: str = "logits",
    opset: int = 13,
) -> Path:
    """Conv -> BN -> Relu -> GlobalAveragePool -> Flatten -> Gemm: a small real classifier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3
    inits = [
        numpy_helper.from_array(w, "conv_w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "bn_s"),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "bn_b"),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "bn_m"),
        numpy_helper.from_array(rng.uniform(0.5, 2, 16).astype(np.float32), "bn_v"),
        numpy_helper.from_array(rng.standard_normal((classes, 16)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["b"]),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    # rename graph input/output
    nodes[0].input[0] = input_name
    nodes[-1].output[0] = output_name
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def make_image(
    path: Path,
    size: tuple[int, int] = (48, 40),
    seed: int = 0,
    mode: str = "RGB",
    fmt: str | None = None,
) -> Path:
    """A smooth random colour image (gradients + noise), saved in the format of its suffix."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [
            xx * 255 / max(w - 1, 1),
            yy * 255 / max(h - 1, 1),
            np.full_like(xx, rng.integers(0, 255)),
        ],
        -1,
    )
    arr = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


def edited_manifest(src: Path, dst: Path, edit: Callable[[dict[str, Any]], Any]) -> Path:
    """``src`` with its manifest edited and the checksums recomputed (a consistent file)."""
    with zipfile.ZipFile(src) as zin:
        members = {i.filename: zin.read(i.filename) for i in zin.infolist()}
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    members["manifest.json"] = body
    members["manifest.sha256"] = hashlib.sha256(body).hexdigest().encode()
    with zipfile.ZipFile(dst, "w") as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    return dst


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("models") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("labels") / "labels.txt"
    p.write_text("".join(f"class-{i}\n" for i in range(NUM_CLASSES)))
    return p


TINY_BUILD = dict(
    preset="imagenet",
    resize=36,
    crop=SIZE,
    mean=(120.0, 115.0, 100.0),
    std=(60.0, 60.0, 60.0),
    engine="onnxruntime",  # pinned: --engine auto picks by timing, which varies
)


@pytest.fixture(scope="session")
def tiny_artifact(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_labels: Path
) -> Path:
    from quench.builder import build

    out = tmp_path_factory.mktemp("artifacts") / "tiny.quench"
    build(tiny_model, out, labels=str(tiny_labels), **TINY_BUILD)
    return out


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for i in range(6):
        make_image(d / f"img{i}.jpg", size=(40 + 7 * i, 56 - 3 * i), seed=i)
    make_image(d / "img6.png", seed=6)
    return d


def make_calib_images(folder: Path, count: int, seed: int) -> Path:
    """``count`` small JPEGs of varied sizes (calibration images) in ``folder``."""
    for i in range(count):
        make_image(folder / f"c{i:02d}.jpg", size=(40 + 3 * i, 44), seed=seed + i)
    return folder


@pytest.fixture()
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Quench cache for this test (``$QUENCH_CACHE``)."""
    monkeypatch.setenv("QUENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str | None]:
    """A local S3 server (moto) for the whole run, its address in ``$AWS_ENDPOINT_URL`` with
    test credentials, as a user points boto3, s3fs and pyarrow at an S3-compatible store; None
    where moto or s3fs is not installed. Started before the shared Ray instance, whose workers
    inherit the environment."""
    if find_spec("moto") is None or find_spec("s3fs") is None:
        yield None
        return
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    url = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        mp.setenv(key, value)
    try:
        yield url
    finally:
        server.stop()
        mp.undo()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str | None) -> object:
    """One local Ray instance for the whole test run (2 CPUs, token authentication); this
    process is its driver. Skips where Ray is not installed."""
    if find_spec("ray") is None:
        pytest.skip('Ray is not installed: pip install "quench[ray]"')
    from raycluster import cluster_env

    env = cluster_env(tmp_path_factory.mktemp("ray-auth"))
    mp = pytest.MonkeyPatch()
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "PYTHONPATH", "RAY_USAGE_STATS_ENABLED"):
        mp.setenv(key, env[key])
    import ray
    from ray._raylet import Config

    Config.initialize("")  # Ray read RAY_AUTH_MODE when first imported: read it again

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        mp.undo()
