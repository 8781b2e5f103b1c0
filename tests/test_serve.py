"""``quench serve``: the real server (uvicorn) spoken to with tritonclient and plain HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import NUM_CLASSES, SIZE, make_image

httpx = pytest.importorskip("httpx")
tritonclient_http = pytest.importorskip("tritonclient.http")
uvicorn = pytest.importorskip("uvicorn")

from quench.model import Model  # noqa: E402
from quench.serve import ServeConfig, create_app  # noqa: E402
from quench.serve.server import uvicorn_config  # noqa: E402

NAME = "tiny"
SHAPE = (3, SIZE, SIZE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server at {base} not ready")


@pytest.fixture(scope="module")
def model(tiny_artifact: Path) -> Model:
    return Model.load(tiny_artifact)


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[str]:
    """The real app under uvicorn in a background thread; yields host:port."""
    config = ServeConfig(
        max_batch=8, max_delay_ms=40, max_body_mb=1.0, name=NAME, quiet=True, timeout_s=10
    )
    app = create_app([Model.load(tiny_artifact)], config)
    port = free_port()
    srv = uvicorn.Server(uvicorn_config(app, config, host="127.0.0.1", port=port))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_ready(f"http://127.0.0.1:{port}")
    yield f"127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[object]:
    c = tritonclient_http.InferenceServerClient(server, concurrency=4)
    yield c
    c.close()


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return make_image(tmp_path_factory.mktemp("serve") / "a.jpg", seed=3).read_bytes()


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def infer_json(x: np.ndarray, **extra: object) -> bytes:
    t = {"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"inputs": [t], **extra}).encode()


# -- tritonclient -----------------------------------------------------------------------------


def test_health_and_metadata(client: object) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(NAME)
    meta = client.get_server_metadata()
    assert meta["name"] == "quench"
    assert "binary_tensor_data" in meta["extensions"]
    mm = client.get_model_metadata(NAME)
    assert mm["name"] == NAME
    assert mm["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, *SHAPE]}]
    assert mm["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, NUM_CLASSES]}]
    assert client.get_model_metadata(NAME, "1")["name"] == NAME
    assert client.get_model_repository_index() == [{"name": NAME, "version": "1", "state": "READY"}]


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("request_outputs", [False, True])
def test_tritonclient_infer(client: object, model: Model, binary: bool, request_outputs: bool):
    x = np.random.default_rng(1).standard_normal((3, *SHAPE)).astype(np.float32)
    inp = tritonclient_http.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = (
        [tritonclient_http.InferRequestedOutput("logits", binary_data=binary)]
        if request_outputs
        else None  # tritonclient then asks for binary outputs
    )
    res = client.infer(NAME, [inp], outputs=outs, request_id="req-7")
    assert res.get_response()["id"] == "req-7"
    np.testing.assert_allclose(res.as_numpy("logits"), model.predict(x), atol=1e-5)


async def _infer_both_ways(app: object, body: bytes, path: str) -> list[object]:
    """The same request through Guard (its lean infer path) and to the inner FastAPI app."""
    out = []
    for target in (app, app.app):
        transport = httpx.ASGITransport(app=target)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            out.append(await ac.post(path, content=body))
    return out


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (f"/v2/models/{NAME}/infer", 200),
        (f"/v2/models/{NAME}/versions/1/infer", 200),
        (f"/v2/models/{NAME}/versions/2/infer", 404),
        ("/v2/models/nope/infer", 404),
    ],
)
def test_lean_infer_path_answers_as_the_routes_do(
    tiny_artifact: Path, path: str, status: int
) -> None:
    app = create_app([Model.load(tiny_artifact)], ServeConfig(quiet=True, name=NAME))
    body = infer_json(np.ones((2, *SHAPE), np.float32), id="x")
    lean, route = asyncio.run(_infer_both_ways(app, body, path))
    assert lean.status_code == route.status_code == status
    assert lean.json() == route.json()
    assert lean.headers["content-type"] == route.headers["content-type"]


def test_request_larger_than_max_batch_is_split(server: str, model: Model) -> None:
    x = np.random.default_rng(2).standard_normal((11, *SHAPE)).astype(np.float32)
    status, _, body = post(f"http://{server}/v2/models/{NAME}/infer", infer_json(x, id=5))
    assert status == 200
    out = json.loads(body)
    assert out["id"] == "5"
    assert out["outputs"][0]["shape"] == [11, NUM_CLASSES]
    y = np.asarray(out["outputs"][0]["data"], np.float32).reshape(11, NUM_CLASSES)
    np.testing.assert_allclose(y, model.predict(x), atol=1e-5)


# -- classify ---------------------------------------------------------------------------------


def test_classify_raw_and_multipart(server: str, model: Model, jpeg: bytes) -> None:
    expected = model.classify([jpeg], topk=3)[0]
    status, _, body = post(f"http://{server}/v2/models/{NAME}/classify?topk=3", jpeg)
    assert status == 200
    got = json.loads(body)
    assert got["model"] == NAME
    assert [t["class"] for t in got["top"]] == expected.classes
    assert [t["name"] for t in got["top"]] == expected.names
    np.testing.assert_allclose([t["score"] for t in got["top"]], expected.scores, atol=1e-5)
    r = httpx.post(
        f"http://{server}/v2/models/{NAME}/classify", files={"file": ("a.jpg", jpeg, "image/jpeg")}
    )
    assert r.status_code == 200
    top = r.json()["top"]
    assert len(top) == 5
    assert top[0]["class"] == expected.classes[0]


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("infer", b"{not json", 400, "not valid JSON"),
        (
            "infer",
            infer_json(np.zeros((1, 3, SIZE, SIZE - 1), np.float32)),
            400,
            "shape",
        ),
        (
            "infer",
            json.dumps(
                {"inputs": [{"name": "images", "datatype": "INT64", "shape": [1], "data": [1]}]}
            ).encode(),
            400,
            "datatype",
        ),
        (
            "infer",
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
            ).encode(),
            400,
            "unknown input",
        ),
        (
            "infer",
            infer_json(np.zeros((1, *SHAPE), np.float32), outputs=[{"name": "nope"}]),
            400,
            "unknown output",
        ),
        ("classify", b"GIF89a this is not really an image", 400, "image"),
        ("classify", b"", 400, "empty"),
        ("classify?topk=0", b"x", 400, "topk"),
    ],
)
def test_bad_requests(server: str, path: str, body: bytes, status: int, words: str) -> None:
    code, _, out = post(f"http://{server}/v2/models/{NAME}/{path}", body)
    assert code == status
    err = json.loads(out)["error"]
    assert words in err
    assert "\n" not in err


def test_unknown_model_and_version(server: str) -> None:
    code, _, out = post(f"http://{server}/v2/models/nope/infer", b"{}")
    assert code == 404
    assert "nope" in json.loads(out)["error"]
    r = httpx.get(f"http://{server}/v2/models/{NAME}/versions/7")
    assert r.status_code == 404
    assert "error" in r.json()


def test_body_too_large(server: str) -> None:
    code, _, out = post(f"http://{server}/v2/models/{NAME}/classify", b"\0" * 1_100_000)
    assert code == 413
    assert "error" in json.loads(out)
    assert httpx.get(f"http://{server}/v2/health/live").status_code == 200  # still up


def test_concurrent_requests_are_batched(server: str, model: Model) -> None:
    xs = np.random.default_rng(4).standard_normal((16, 1, *SHAPE)).astype(np.float32)
    barrier = threading.Barrier(16)

    def one(i: int) -> np.ndarray:
        barrier.wait()
        code, _, body = post(f"http://{server}/v2/models/{NAME}/infer", infer_json(xs[i]))
        assert code == 200
        return np.asarray(json.loads(body)["outputs"][0]["data"], np.float32)

    with ThreadPoolExecutor(16) as pool:
        ys = list(pool.map(one, range(16)))
    expected = model.predict(xs[:, 0])
    for i, y in enumerate(ys):
        np.testing.assert_allclose(y, expected[i], atol=1e-5)
    text = httpx.get(f"http://{server}/metrics").text
    buckets = {}
    for line in text.splitlines():
        if line.startswith("quench_batch_size_bucket") and 'le="1.0"' in line:
            buckets["le1"] = float(line.split()[-1])
        if line.startswith("quench_batch_size_count"):
            buckets["count"] = float(line.split()[-1])
    assert buckets["count"] > buckets["le1"], "no engine call ran more than one image"


def test_metrics(server: str) -> None:
    httpx.get(f"http://{server}/v2/health/live")
    text = httpx.get(f"http://{server}/metrics").text
    for name in (
        "quench_requests_total",
        "quench_request_duration_seconds_bucket",
        "quench_batch_size_bucket",
        "quench_queue_depth",
    ):
        assert name in text
    assert 'endpoint="/v2/health/live"' in text
    assert 'status="400"' in text or 'status="200"' in text


# -- in-process: back-pressure and timeouts with a slow engine --------------------------------


def slow_app(tiny_artifact: Path, delay: float, **config: object) -> object:
    m = Model.load(tiny_artifact)
    fast = m.run_batch

    def slow(batch: np.ndarray) -> np.ndarray:
        time.sleep(delay)
        return fast(batch)

    m.run_batch = slow  # type: ignore[method-assign]
    return create_app([m], ServeConfig(quiet=True, name=NAME, **config))


async def _post_many(app: object, n: int, body: bytes) -> list[object]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
        reqs = [ac.post(f"/v2/models/{NAME}/infer", content=body) for _ in range(n)]
        return await asyncio.gather(*reqs)


def test_queue_full_is_503_with_retry_after(tiny_artifact: Path) -> None:
    app = slow_app(tiny_artifact, 0.2, max_batch=1, max_queue=1, max_delay_ms=0)
    rs = asyncio.run(_post_many(app, 4, infer_json(np.zeros((1, *SHAPE), np.float32))))
    codes = sorted(r.status_code for r in rs)
    assert 200 in codes
    assert 503 in codes
    full = next(r for r in rs if r.status_code == 503)
    assert full.headers["retry-after"] == "1"
    assert "queue is full" in full.json()["error"]


def test_timeout_is_504(tiny_artifact: Path) -> None:
    app = slow_app(tiny_artifact, 0.5, timeout_s=0.1)
    (r,) = asyncio.run(_post_many(app, 1, infer_json(np.zeros((1, *SHAPE), np.float32))))
    assert r.status_code == 504
    assert "no answer" in r.json()["error"]


# -- the CLI: SIGTERM during requests ---------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cli_serve_sigterm_drains(tiny_artifact: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "quench", "serve", str(tiny_artifact)),
            *("--port", str(port), "--name", NAME, "--max-delay-ms", "30", "--max-batch", "4"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_ready(base)
        body = infer_json(np.zeros((1, *SHAPE), np.float32))
        ok, refused, bad = [], [], []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    code, _, _ = post(f"{base}/v2/models/{NAME}/infer", body)
                except OSError:
                    # refused, or reset by a closing connection before the server read the
                    # request: never accepted (the access log below proves nothing was dropped)
                    refused.append(1)
                    time.sleep(0.01)
                    continue
                (ok if code == 200 else bad).append(code)

        threads = [threading.Thread(target=hammer) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while len(ok) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
        stop.set()
        for t in threads:
            t.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0, stderr
    assert len(ok) >= 20
    assert bad == [], bad
    log = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert log, stderr
    assert {"method", "path", "status", "ms", "model", "batch"} <= set(log[0])
    infers = [e for e in log if e["path"].endswith("/infer")]
    assert all(e["status"] == 200 for e in infers)  # every request the server took: answered
    assert len(infers) == len(ok)  # ... and the answer reached its client


def test_cli_serve_name_needs_one_artifact(tiny_artifact: Path) -> None:
    from typer.testing import CliRunner

    from quench.cli import app

    res = CliRunner().invoke(app, ["serve", str(tiny_artifact), str(tiny_artifact), "--name", "x"])
    assert res.exit_code == 2


def test_create_app_rejects_duplicate_names(tiny_artifact: Path) -> None:
    m = Model.load(tiny_artifact)
    with pytest.raises(ValueError, match="two models"):
        create_app([m, m])
