"""``quench serve --grpc-port``: the KServe v2 gRPC service, spoken to with tritonclient.grpc
and raw gRPC calls, beside the HTTP app on the same models, batcher, limits and metrics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from quench.model import Model  # noqa: E402
from quench.serve import ServeConfig, create_app  # noqa: E402
from quench.serve.server import build  # noqa: E402
from test_serve import NAME, SHAPE, free_port, infer_json, post, slow_app, wait_ready  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))
from common import mutations  # noqa: E402  (bench/fuzz_grpc.py's malformed messages)

SERVICE = "inference.GRPCInferenceService"


class Running:
    """An app and its gRPC listener under the real server, in a background thread."""

    def __init__(self, app: object, config: ServeConfig) -> None:
        self.port, self.grpc_port = free_port(), free_port()
        self.server = build(app, config, "127.0.0.1", self.port, self.grpc_port, log=False)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_ready(self.base)
        self.channel = grpc.insecure_channel(self.target)
        grpc.channel_ready_future(self.channel).result(timeout=10)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def call(self, method: str, data: bytes, timeout: float = 10) -> bytes:
        """A raw unary call: request and response bytes as they are."""
        rpc = self.channel.unary_unary(f"/{SERVICE}/{method}")
        return rpc(data, timeout=timeout)

    def infer(self, req: pb.ModelInferRequest, timeout: float = 10) -> pb.ModelInferResponse:
        return pb.ModelInferResponse.FromString(
            self.call("ModelInfer", req.SerializeToString(), timeout)
        )

    def stop(self) -> None:
        self.channel.close()
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model(tiny_artifact: Path) -> Model:
    return Model.load(tiny_artifact)


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[Running]:
    config = ServeConfig(
        max_batch=8, max_delay_ms=40, max_body_mb=1.0, name=NAME, quiet=True, timeout_s=10
    )
    running = Running(create_app([Model.load(tiny_artifact)], config), config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: Running) -> Iterator[object]:
    c = tritonclient_grpc.InferenceServerClient(server.target)
    yield c
    c.close()


def request(x: np.ndarray, raw: bool = True, **fields: object) -> pb.ModelInferRequest:
    t = pb.ModelInferRequest.InferInputTensor(name="images", datatype="FP32", shape=x.shape)
    req = pb.ModelInferRequest(inputs=[t], **{"model_name": NAME, **fields})
    if raw:
        req.raw_input_contents.append(x.astype("<f4").tobytes())
    else:
        req.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    return req


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


# -- tritonclient.grpc ------------------------------------------------------------------------


def test_health_metadata_and_index(client: object) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(NAME)
    assert client.is_model_ready(NAME, "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "quench"
    assert "binary_tensor_data" in meta["extensions"]
    m = client.get_model_metadata(NAME, as_json=True)
    shape = ["-1", *map(str, SHAPE)]
    assert m["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": shape}
    assert m["outputs"][0]["name"] == "logits"
    index = client.get_model_repository_index(as_json=True)
    assert index["models"] == [{"name": NAME, "version": "1", "state": "READY"}]
    config = client.get_model_config(NAME, as_json=True)["config"]
    assert config["max_batch_size"] == 8
    want = {"name": "images", "data_type": "TYPE_FP32", "dims": [str(d) for d in SHAPE]}
    assert config["input"][0] == want
    assert config["output"][0]["dims"] == [str(m["outputs"][0]["shape"][1])]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "40000"


@pytest.mark.parametrize("n", [1, 3, 11])  # 11 > max_batch: split into chunks
def test_tritonclient_infer(client: object, model: Model, n: int) -> None:
    x = images(n, seed=n)
    inp = tritonclient_grpc.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = tritonclient_grpc.InferRequestedOutput("logits")
    res = client.infer(NAME, [inp], outputs=[out], request_id="r1")
    y = res.as_numpy("logits")
    np.testing.assert_allclose(y, model.run_batch(x), rtol=1e-4, atol=1e-5)
    assert res.get_response().id == "r1"
    assert res.get_response().model_version == "1"


def test_typed_contents_match_raw(server: Running, model: Model) -> None:
    x = images(2, seed=5)
    typed = server.infer(request(x, raw=False))
    raw = server.infer(request(x))
    assert list(typed.outputs[0].shape) == [2, model.run_batch(x[:1]).shape[1]]
    assert typed.raw_output_contents == raw.raw_output_contents
    y = np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(typed.outputs[0].shape)
    np.testing.assert_allclose(y, model.run_batch(x), rtol=1e-4, atol=1e-5)


def test_grpc_and_http_requests_share_the_batcher(server: Running, tiny_artifact: Path) -> None:
    body = infer_json(images(1))
    url = f"{server.base}/v2/models/{NAME}/infer"
    with ThreadPoolExecutor(8) as pool:
        grpc_calls = [pool.submit(server.infer, request(images(1, seed=i))) for i in range(4)]
        http_calls = [pool.submit(post, url, body) for _ in range(4)]
        assert all(f.result().outputs for f in grpc_calls)
        assert [f.result()[0] for f in http_calls] == [200] * 4
    with urllib.request.urlopen(f"{server.base}/metrics", timeout=5) as r:
        text = r.read().decode()
    ok = f'endpoint="/{SERVICE}/ModelInfer",method="GRPC",status="OK"'
    assert f"quench_requests_total{{{ok}}}" in text
    # 8 requests within 40 ms of each other: some engine batch held more than one image
    sizes = [line for line in text.splitlines() if line.startswith("quench_batch_size_bucket")]
    le1 = next(float(v.split()[-1]) for v in sizes if 'le="1.0"' in v)
    total = next(float(v.split()[-1]) for v in sizes if 'le="+Inf"' in v)
    assert total > le1


# -- bad messages: a status code and one line, never a crash ----------------------------------


def _bad_requests() -> list[tuple[str, object, grpc.StatusCode, str]]:
    x = images(1)
    two = request(x)
    two.inputs.add(name="images", datatype="FP32", shape=x.shape)
    short = request(x)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    both = request(x)
    both.inputs[0].contents.fp32_contents.append(1.0)
    wrong_field = request(x, raw=False)
    wrong_field.inputs[0].contents.ClearField("fp32_contents")
    wrong_field.inputs[0].contents.int_contents.append(1)
    count = request(x, raw=False)
    count.inputs[0].contents.fp32_contents.append(1.0)
    bad_output = request(x)
    bad_output.outputs.add(name="nope")
    int8 = request(x)
    int8.inputs[0].datatype = "INT8"
    shape = request(x)
    shape.inputs[0].shape[:] = [1, 3, 5, 5]
    unknown = request(x, model_name="nope")
    version = request(x, model_version="7")
    return [
        ("garbage", b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a valid"),
        ("two inputs", two, grpc.StatusCode.INVALID_ARGUMENT, "exactly one input"),
        ("short raw", short, grpc.StatusCode.INVALID_ARGUMENT, "expected"),
        ("raw and typed", both, grpc.StatusCode.INVALID_ARGUMENT, "not 1 entries"),
        ("int contents", wrong_field, grpc.StatusCode.INVALID_ARGUMENT, "int_contents"),
        ("typed contents (valid)", request(x, raw=False, id="a"), None, ""),
        ("value count", count, grpc.StatusCode.INVALID_ARGUMENT, "values for shape"),
        ("unknown output", bad_output, grpc.StatusCode.INVALID_ARGUMENT, "unknown output"),
        ("datatype", int8, grpc.StatusCode.INVALID_ARGUMENT, "datatype 'INT8'"),
        ("shape", shape, grpc.StatusCode.INVALID_ARGUMENT, "does not match"),
        ("unknown model", unknown, grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
        ("version", version, grpc.StatusCode.NOT_FOUND, "no version '7'"),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_messages_get_a_status_and_one_line(server: Running, case: tuple) -> None:
    _, req, code, words = case
    data = req if isinstance(req, bytes) else req.SerializeToString()
    if code is None:  # a valid request among the bad ones
        assert pb.ModelInferResponse.FromString(server.call("ModelInfer", data)).id == "a"
        return
    with pytest.raises(grpc.RpcError) as exc:
        server.call("ModelInfer", data)
    assert exc.value.code() == code
    assert words in exc.value.details()
    assert "\n" not in exc.value.details()
    assert server.infer(request(images(1))).outputs  # still serving


def test_mutated_messages_get_client_errors_never_internal(server: Running) -> None:
    x = images(1)
    valid = [request(x).SerializeToString(), request(x, raw=False).SerializeToString()]
    meta = pb.ModelMetadataRequest(name=NAME).SerializeToString()
    codes: dict[str, int] = {}
    for method, data in [
        ("ModelInfer", valid[0]),
        ("ModelInfer", valid[1]),
        ("ModelMetadata", meta),
    ]:
        for bad_bytes in mutations(data, 60, np.random.default_rng(len(data))):
            try:
                server.call(method, bad_bytes)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                assert "\n" not in (exc.details() or "")
            codes[code] = codes.get(code, 0) + 1
    assert set(codes) <= {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}, codes
    assert codes.get("INVALID_ARGUMENT", 0) > 60
    assert server.infer(request(x)).outputs  # still serving


def test_no_contents_at_all(server: Running) -> None:
    req = request(images(1), raw=False)
    req.inputs[0].contents.ClearField("fp32_contents")
    with pytest.raises(grpc.RpcError) as exc:
        server.infer(req)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "got neither" in exc.value.details()


def test_message_over_the_body_limit_and_unknown_methods(server: Running) -> None:
    big = request(images(1))
    big.raw_input_contents[0] = b"\0" * (2 * 1024 * 1024)  # max_body_mb=1
    with pytest.raises(grpc.RpcError) as exc:
        server.infer(big)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as exc:
        server.call("SystemSharedMemoryStatus", b"")
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as exc:
        server.call("ModelMetadata", pb.ModelMetadataRequest(name="nope").SerializeToString())
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_tritonclient_sees_the_error(client: object) -> None:
    inp = tritonclient_grpc.InferInput("images", [1, 3, 5, 5], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 5, 5), np.float32))
    with pytest.raises(InferenceServerException, match="does not match"):
        client.infer(NAME, [inp])


# -- limits with a slow engine ----------------------------------------------------------------


def _slow(tiny_artifact: Path, delay: float, **config: object) -> Running:
    app = slow_app(tiny_artifact, delay, **config)
    return Running(app, app.state.config)


def _codes(running: Running, n: int) -> list[grpc.StatusCode]:
    def one(i: int) -> grpc.StatusCode:
        try:
            running.infer(request(images(1, seed=i)))
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_queue_full_is_unavailable(tiny_artifact: Path) -> None:
    running = _slow(tiny_artifact, 0.3, max_batch=1, max_queue=1, max_delay_ms=0)
    try:
        codes = _codes(running, 5)
    finally:
        running.stop()
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.UNAVAILABLE in codes


def test_timeout_is_deadline_exceeded(tiny_artifact: Path) -> None:
    running = _slow(tiny_artifact, 0.6, timeout_s=0.15)
    try:
        with pytest.raises(grpc.RpcError) as exc:
            running.infer(request(images(1)))
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no answer within 0.15 s" in exc.value.details()
    finally:
        running.stop()


def test_rpcs_in_progress_are_bounded(tiny_artifact: Path) -> None:
    running = _slow(tiny_artifact, 0.3, max_connections=2, max_delay_ms=0)
    try:
        codes = _codes(running, 6)
    finally:
        running.stop()
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes


def test_idle_connections_are_closed(tiny_artifact: Path) -> None:
    config = ServeConfig(name=NAME, quiet=True, keep_alive_s=0.3)
    running = Running(create_app([Model.load(tiny_artifact)], config), config)

    async def states() -> tuple[object, object]:
        async with grpc.aio.insecure_channel(running.target) as ch:
            await ch.unary_unary(f"/{SERVICE}/ServerLive")(b"", timeout=5)
            busy = ch.get_state()
            await asyncio.sleep(1.5)
            return busy, ch.get_state()

    try:
        busy, later = asyncio.run(states())
    finally:
        running.stop()
    assert busy == grpc.ChannelConnectivity.READY
    assert later == grpc.ChannelConnectivity.IDLE  # the server sent GOAWAY


# -- the CLI ----------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cli_sigterm_drains_both_listeners(tiny_artifact: Path) -> None:
    port, gport = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "quench", "serve", str(tiny_artifact), "--name", NAME),
            *("--port", str(port), "--grpc-port", str(gport)),
            *("--max-delay-ms", "30", "--max-batch", "4"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base, body = f"http://127.0.0.1:{port}", infer_json(images(1))
    ok = {"http": 0, "grpc": 0}
    bad: list[object] = []
    stop = threading.Event()

    def hammer_http() -> None:
        while not stop.is_set():
            try:
                code, _, _ = post(f"{base}/v2/models/{NAME}/infer", body)
            except OSError:  # refused or reset before the server read it: never accepted
                time.sleep(0.01)
                continue
            if code == 200:
                ok["http"] += 1
            else:
                bad.append(code)

    def hammer_grpc() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:
            rpc = ch.unary_unary(f"/{SERVICE}/ModelInfer")
            data = request(images(1)).SerializeToString()
            while not stop.is_set():
                try:
                    rpc(data, timeout=10)
                    ok["grpc"] += 1
                except grpc.RpcError as exc:
                    # not listening (any more), or a call gRPC took in but the server had not
                    # started yet when it stopped: never accepted (the log below proves it)
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        bad.append((exc.code(), exc.details()))
                    time.sleep(0.01)

    try:
        wait_ready(base)
        threads = [threading.Thread(target=f) for f in [hammer_http, hammer_grpc] * 3]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while min(ok.values()) < 15 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 0, stderr
    assert min(ok.values()) >= 15, (ok, stderr[-2000:])
    assert bad == [], bad
    log = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    grpc_log = [e for e in log if e["path"] == f"/{SERVICE}/ModelInfer"]
    http_log = [e for e in log if e["path"].endswith("/infer")]
    assert {e["status"] for e in grpc_log} == {"OK"}
    assert {e["model"] for e in grpc_log} == {NAME}
    assert all(e["status"] == 200 for e in http_log)
    # every request either server took was answered, and the answer reached its client
    assert (len(http_log), len(grpc_log)) == (ok["http"], ok["grpc"])


def test_cli_busy_grpc_port_is_one_line(tiny_artifact: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        gport = busy.getsockname()[1]
        done = subprocess.run(
            [
                *(sys.executable, "-m", "quench", "serve", str(tiny_artifact)),
                *("--port", str(free_port()), "--grpc-port", str(gport)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"port {gport} is already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--port", "8123", "--grpc-port", "8123"], "is the HTTP --port too"),
        (["--grpc-port", "8124", "--ray", "auto"], "not available with --ray"),
    ],
)
def test_cli_grpc_port_misuse_is_one_line(tiny_artifact: Path, args: list[str], words: str) -> None:
    from typer.testing import CliRunner

    from quench.cli import app

    res = CliRunner().invoke(app, ["serve", str(tiny_artifact), *args])
    assert res.exit_code == 2
    assert words in res.output
