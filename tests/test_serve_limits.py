"""``quench serve`` under malformed, slow, vanished and oversized clients (issue 16, Server).

Raw sockets and keep-alive ``http.client`` connections against the real uvicorn server with
Quench's HTTP protocol and tight limits, so every deadline fires within a second or two.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import NUM_CLASSES, SIZE, make_image

pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from quench.model import Model  # noqa: E402
from quench.serve import ServeConfig, create_app  # noqa: E402
from quench.serve.server import uvicorn_config  # noqa: E402
from test_serve import NAME, SHAPE, free_port, infer_json, slow_app, wait_ready  # noqa: E402

LIMITS = dict(
    name=NAME,
    quiet=True,
    timeout_s=1.5,
    header_timeout_s=0.5,
    keep_alive_s=5.0,
    max_connections=12,
    max_body_mb=8.0,
    max_image_mpix=1.0,
    decode_workers=2,
    max_delay_ms=5,
)


class Running:
    """An app under uvicorn (Quench's protocol) in a background thread."""

    def __init__(self, app: object, config: ServeConfig) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn_config(app, config, host="127.0.0.1", port=self.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_ready(self.base)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def conn(self, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def sock(self, timeout: float = 5) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def metric(self, status: str) -> float:
        c = self.conn()
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("quench_requests_total{") and f'status="{status}"' in line:
                total += float(line.split()[-1])
        return total

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[Running]:
    config = ServeConfig(**LIMITS)
    srv = Running(create_app([Model.load(tiny_artifact)], config), config)
    yield srv
    srv.stop()


def read_response(sock: socket.socket, limit: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP response (status, lower-case headers, body) read until the socket closes
    or Content-Length is complete; raises TimeoutError when nothing arrives within ``limit``."""
    sock.settimeout(limit)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without a response: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    need = int(headers.get("content-length", "0"))
    while len(body) < need:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def closed(sock: socket.socket, limit: float = 3.0) -> bool:
    """True when the server closes ``sock`` within ``limit`` seconds (EOF or reset)."""
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def one_json_error(body: bytes) -> str:
    err = json.loads(body)["error"]
    assert isinstance(err, str)
    assert "\n" not in err
    return err


# -- request schema ---------------------------------------------------------------------------


def _binary(size: object, params_extra: dict | None = None) -> tuple[bytes, dict[str, str]]:
    x = np.zeros((1, *SHAPE), "<f4").tobytes()
    params = {"binary_data_size": size, **(params_extra or {})}
    header = json.dumps(
        {
            "inputs": [
                {"name": "images", "datatype": "FP32", "shape": [1, *SHAPE], "parameters": params}
            ]
        }
    ).encode()
    return header + x, {"Inference-Header-Content-Length": str(len(header))}


def _inp(**fields: object) -> bytes:
    t = {
        "name": "images",
        "datatype": "FP32",
        "shape": [1, *SHAPE],
        "data": [0.0] * (3 * SIZE * SIZE),
    }
    t.update(fields)
    return json.dumps({"inputs": [t]}).encode()


MALFORMED = {
    "float binary_data_size": _binary(float(3 * SIZE * SIZE * 4)),
    "string binary_data_size": _binary("12288"),
    "negative binary_data_size": _binary(-4),
    "input parameters list": (_inp(parameters=[1]), {}),
    "request parameters list": (
        json.dumps({"inputs": json.loads(_inp())["inputs"], "parameters": [1]}).encode(),
        {},
    ),
    "parameter value object": (_inp(parameters={"x": {"y": 1}}), {}),
    "inputs not a list": (b'{"inputs": {"name": "images"}}', {}),
    "input not an object": (b'{"inputs": [1]}', {}),
    "no inputs": (b'{"inputs": []}', {}),
    "body a list": (b"[1, 2]", {}),
    "body a number": (b"7", {}),
    "shape strings": (_inp(shape=["1", "3"]), {}),
    "shape floats": (_inp(shape=[1.0, 3.0, float(SIZE), float(SIZE)]), {}),
    "shape negative": (_inp(shape=[-1, *SHAPE]), {}),
    "shape huge": (_inp(shape=[10**30, *SHAPE]), {}),
    "data strings": (_inp(data=["1"] * (3 * SIZE * SIZE)), {}),
    "data booleans": (_inp(data=[True] * (3 * SIZE * SIZE)), {}),
    "data object": (_inp(data={"a": 1}), {}),
    "data ragged": (_inp(data=[[1.0, 2.0], [3.0]]), {}),
    "data huge integer": (_inp(data=[10**400]), {}),
    "name not a string": (_inp(name=7), {}),
    "datatype missing": (json.dumps({"inputs": [{"name": "images", "shape": [1]}]}).encode(), {}),
    "id an object": (
        json.dumps({"id": {"a": 1}, "inputs": json.loads(_inp())["inputs"]}).encode(),
        {},
    ),
    "outputs not a list": (
        json.dumps({"inputs": json.loads(_inp())["inputs"], "outputs": "logits"}).encode(),
        {},
    ),
    "output binary_data a string": (
        json.dumps(
            {
                "inputs": json.loads(_inp())["inputs"],
                "outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}],
            }
        ).encode(),
        {},
    ),
    "unknown field": (
        json.dumps({"inputs": json.loads(_inp())["inputs"], "extra": 1}).encode(),
        {},
    ),
    "not UTF-8": (b'{"inputs": "\xff\xfe"}', {}),
    "header length negative": (_inp(), {"Inference-Header-Content-Length": "-3"}),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_json_400_and_keep_the_connection(
    server: Running, case: str
) -> None:
    body, headers = MALFORMED[case]
    conn = server.conn()
    conn.request("POST", f"/v2/models/{NAME}/infer", body, headers)
    resp = conn.getresponse()
    out = resp.read()
    assert resp.status == 400, (case, out)
    assert resp.getheader("content-type") == "application/json"
    one_json_error(out)
    assert resp.getheader("connection") != "close"
    # the same keep-alive connection then serves a valid request
    conn.request("POST", f"/v2/models/{NAME}/infer", infer_json(np.zeros((1, *SHAPE), np.float32)))
    ok = conn.getresponse()
    assert ok.status == 200, ok.read()
    assert json.loads(ok.read())["outputs"][0]["shape"] == [1, NUM_CLASSES]
    conn.close()


def test_malformed_field_is_named(server: Running) -> None:
    body, headers = MALFORMED["float binary_data_size"]
    conn = server.conn()
    conn.request("POST", f"/v2/models/{NAME}/infer", body, headers)
    err = one_json_error(conn.getresponse().read())
    assert "inputs.0.parameters.binary_data_size" in err
    conn.request("POST", f"/v2/models/{NAME}/infer", *MALFORMED["input parameters list"])
    assert "inputs.0.parameters" in one_json_error(conn.getresponse().read())


def test_nested_data_and_integer_id_still_accepted(server: Running, model: Model) -> None:
    x = np.random.default_rng(5).standard_normal((2, *SHAPE)).astype(np.float32)
    body = {"id": 9, "inputs": [{"name": "images", "datatype": "FP32", "shape": [2, *SHAPE]}]}
    body["inputs"][0]["data"] = x.tolist()  # nested row-major
    body["inputs"][0]["parameters"] = {"custom": "ok"}
    conn = server.conn()
    conn.request("POST", f"/v2/models/{NAME}/infer", json.dumps(body).encode())
    resp = conn.getresponse()
    out = json.loads(resp.read())
    assert resp.status == 200, out
    assert out["id"] == "9"
    y = np.asarray(out["outputs"][0]["data"], np.float32).reshape(2, NUM_CLASSES)
    np.testing.assert_allclose(y, model.predict(x), atol=1e-5)


@pytest.fixture(scope="module")
def model(tiny_artifact: Path) -> Model:
    return Model.load(tiny_artifact)


# -- NaN --------------------------------------------------------------------------------------


def _strict_json(raw: bytes) -> object:
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(raw, parse_constant=refuse)


def test_nan_outputs_are_null(server: Running) -> None:
    x = np.zeros((2, *SHAPE), "<f4")
    x[1] = np.nan  # the second image's logits are all NaN
    body, headers = _binary(x.nbytes)
    header = body[: int(headers["Inference-Header-Content-Length"])]
    header = header.replace(b'"shape": [1,', b'"shape": [2,')
    conn = server.conn()
    conn.request(
        "POST",
        f"/v2/models/{NAME}/infer",
        header + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    resp = conn.getresponse()
    out = _strict_json(resp.read())
    assert resp.status == 200
    data = out["outputs"][0]["data"]
    assert all(v is None for v in data[NUM_CLASSES:])
    assert all(isinstance(v, float) for v in data[:NUM_CLASSES])


def test_nan_scores_are_null(model: Model) -> None:
    from quench.serve.api import ClassifierAPI

    api = ClassifierAPI(model, NAME)
    top = api.encode_classify(np.full((1, NUM_CLASSES), np.nan, np.float32), 3)["top"]
    assert [t["score"] for t in top] == [None, None, None]
    json.dumps(top, allow_nan=False)


# -- parser-level errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS on a plain port
        (b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 1e9\r\n\r\n", 400),
        (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000, 431),  # never ends
        (b"POST /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 21 + b"\r\n\r\n", 400),
        (b"GET /v2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
)
def test_unparsable_requests_answer_json(server: Running, raw: bytes, status: int) -> None:
    with server.sock() as s:
        s.sendall(raw)
        code, headers, body = read_response(s)
    assert code == status
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert "invalid HTTP request" in one_json_error(body)


def test_headers_over_the_limit_are_431(server: Running) -> None:
    with server.sock() as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n")
        code, headers, body = read_response(s)
    assert code == 431
    assert headers["connection"] == "close"
    assert "16,384 bytes" in one_json_error(body)


def test_huge_content_length_is_413_at_once(server: Running) -> None:
    with server.sock() as s:
        s.sendall(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 99999999999999999999\r\n\r\n"
        )
        t0 = time.monotonic()
        code, _, body = read_response(s, limit=3)
    assert code == 413
    assert time.monotonic() - t0 < 1.0
    assert "over" in one_json_error(body)


# -- timeouts and connection limits -----------------------------------------------------------


def test_content_length_without_body_is_answered_in_time(server: Running) -> None:
    """``curl -m5 -H 'Content-Length: 50000000' -X POST .../infer``: an answer, not a hang."""
    with server.sock() as s:
        s.sendall(
            f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 50000000\r\n\r\n".encode()
        )
        code, headers, body = read_response(s, limit=5)
    assert code == 413
    assert headers["connection"] == "close"
    one_json_error(body)


def test_body_within_limit_never_sent_is_408(server: Running) -> None:
    with server.sock() as s:
        s.sendall(
            f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
            '{"inputs": '.encode()
        )
        t0 = time.monotonic()
        code, headers, body = read_response(s, limit=5)
        assert code == 408
        assert 1.0 < time.monotonic() - t0 < 4.0  # timeout_s = 1.5
        assert headers["connection"] == "close"
        assert "not received within 1.5 s" in one_json_error(body)
        assert closed(s)


def test_trickled_body_is_408(server: Running) -> None:
    """Slowloris on the body: one byte every 0.1 s never finishes within the deadline."""
    with server.sock() as s:
        s.sendall(
            f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 400\r\n\r\n".encode()
        )
        answer: list[tuple[int, dict[str, str], bytes]] = []

        def reader() -> None:
            answer.append(read_response(s, limit=6))

        t = threading.Thread(target=reader)
        t.start()
        t0 = time.monotonic()
        while t.is_alive() and time.monotonic() - t0 < 5:
            try:
                s.send(b" ")
            except OSError:
                break
            time.sleep(0.1)
        t.join(6)
    assert answer, "no answer to a trickled body"
    assert answer[0][0] == 408


@pytest.mark.parametrize("partial", [b"", b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"])
def test_headers_not_sent_in_time_close_the_connection(server: Running, partial: bytes) -> None:
    with server.sock() as s:
        s.sendall(partial)
        t0 = time.monotonic()
        if partial:
            code, _, body = read_response(s, limit=3)
            assert code == 408
            assert "headers not received" in one_json_error(body)
        assert closed(s, limit=3)
        assert time.monotonic() - t0 < 2.5  # header_timeout_s = 0.5


def test_connections_beyond_the_limit_get_503(server: Running) -> None:
    socks = []
    try:
        for _ in range(LIMITS["max_connections"]):
            socks.append(server.sock())
        time.sleep(0.1)
        with server.sock() as extra:
            code, headers, body = read_response(extra, limit=3)
        assert code == 503
        assert headers["retry-after"] == "1"
        assert "too many open connections" in one_json_error(body)
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    c = server.conn()  # the held connections closed: served again
    c.request("GET", "/v2/health/live")
    assert c.getresponse().status == 200
    c.close()


# -- a client that goes away ------------------------------------------------------------------


def test_client_gone_mid_body_is_499_without_traceback(server: Running) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        before_499, before_500 = server.metric("499"), server.metric("500")
        for _ in range(5):
            with server.sock() as s:
                s.sendall(
                    f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\n"
                    "Content-Length: 100000\r\n\r\n".encode()
                    + b"x" * 1000
                )
                time.sleep(0.05)
            time.sleep(0.05)
        deadline = time.monotonic() + 5
        while server.metric("499") < before_499 + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert server.metric("499") == before_499 + 5
    assert server.metric("500") == before_500
    assert not [r for r in records if r.levelno >= logging.ERROR], records


# -- /classify: bounded decoding --------------------------------------------------------------


def test_classify_refuses_too_many_decoded_pixels(server: Running, tmp_path: Path) -> None:
    """The issue's PNG: 9400x9400 pixels in a few hundred KB (here 1 MP is the limit)."""
    path = tmp_path / "big.png"
    Image.new("L", (9400, 9400), 7).save(path)
    assert path.stat().st_size < 1_000_000
    conn = server.conn()
    conn.request("POST", f"/v2/models/{NAME}/classify", path.read_bytes())
    resp = conn.getresponse()
    assert resp.status == 400
    assert "over this server's limit of 1,000,000" in one_json_error(resp.read())


def test_classify_large_jpeg_decodes_at_reduced_scale(server: Running, tmp_path: Path) -> None:
    """A 4 MP JPEG is over the 1 MP limit at full size, but decoded at 1/8 scale it is not."""
    path = make_image(tmp_path / "big.jpg", size=(2400, 1800), seed=4)
    conn = server.conn()
    conn.request("POST", f"/v2/models/{NAME}/classify", path.read_bytes())
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert len(json.loads(resp.read())["top"]) == 5


def test_decodes_run_at_most_decode_workers_at_once(tiny_artifact: Path, tmp_path: Path) -> None:
    config = ServeConfig(**LIMITS)
    srv = Running(create_app([Model.load(tiny_artifact)], config), config)
    png = tmp_path / "a.png"
    make_image(png, size=(900, 700), seed=2)
    data = png.read_bytes()
    try:
        codes: list[int] = []

        def one() -> None:
            c = srv.conn(timeout=30)
            c.request("POST", f"/v2/models/{NAME}/classify", data)
            codes.append(c.getresponse().status)
            c.close()

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        pool = srv.app.state.decoder
    finally:
        srv.stop()
    assert codes and set(codes) <= {200, 504}, codes
    assert 1 <= pool.peak <= 2


def test_reduced_decode_matches_the_reference(tmp_path: Path) -> None:
    from quench.imaging import load_pixels
    from quench.presets import DataConfig

    data = DataConfig(resize=36, crop=32)
    for mode in ("RGB", "L", "P", "I;16"):
        path = make_image(tmp_path / f"r{mode.replace(';', '')}.png", size=(420, 300), mode=mode)
        ref = load_pixels(path, data).astype(np.int16)
        got = load_pixels(path, data, reduce=True).astype(np.int16)
        assert got.shape == ref.shape
        assert np.abs(got - ref).mean() < 1.5, mode


# -- shutdown ---------------------------------------------------------------------------------


def test_responses_during_shutdown_say_connection_close(tiny_artifact: Path) -> None:
    limits = {k: v for k, v in LIMITS.items() if k not in ("name", "quiet")}
    limits["timeout_s"] = 10.0
    srv = Running(slow_app(tiny_artifact, 0.6, **limits), ServeConfig(**limits))
    conn = srv.conn()
    body = infer_json(np.zeros((1, *SHAPE), np.float32))
    conn.request("POST", f"/v2/models/{NAME}/infer", body)
    time.sleep(0.2)  # in flight on the slow engine
    srv.server.should_exit = True
    resp = conn.getresponse()
    resp.read()
    srv.thread.join(15)
    assert resp.status == 200
    assert resp.getheader("connection") == "close"


def test_timeout_counts_from_the_headers_504(tiny_artifact: Path) -> None:
    """--timeout-s is per request: a body that took 0.7 s leaves 0.3 s for a 0.6 s engine."""
    limits = {k: v for k, v in LIMITS.items() if k not in ("name", "quiet")}
    limits["timeout_s"] = 1.0
    srv = Running(slow_app(tiny_artifact, 0.6, **limits), ServeConfig(**limits))
    body = infer_json(np.zeros((1, *SHAPE), np.float32))
    try:
        with srv.sock() as s:
            s.sendall(
                f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:100]
            )
            time.sleep(0.7)
            s.sendall(body[100:])
            code, _, out = read_response(s)
    finally:
        srv.stop()
    assert code == 504
    assert "no answer within 1 s" in one_json_error(out)


# -- OpenAPI ----------------------------------------------------------------------------------


def test_openapi_describes_the_v2_routes(server: Running) -> None:
    conn = server.conn()
    conn.request("GET", "/openapi.json")
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    assert resp.status == 200
    paths = doc["paths"]
    for p in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
        "/v2/models/{name}/classify",
        "/v2/repository/index",
    ):
        assert p in paths, p
    infer = paths["/v2/models/{name}/infer"]["post"]
    ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    req = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert req["required"] == ["inputs"]
    params = doc["components"]["schemas"]["Parameters"]["properties"]
    assert "integer" in json.dumps(params["binary_data_size"])
    name = next(p for p in infer["parameters"] if p["name"] == "name")
    assert name["schema"]["enum"] == [NAME]
    assert "400" in infer["responses"]
    for target in json.dumps(doc).split('"$ref": "')[1:]:
        assert target.split('"')[0].rsplit("/", 1)[1] in doc["components"]["schemas"]


# -- the CLI: busy port, several builds of one model ------------------------------------------


def test_cli_serve_busy_port_is_one_line_before_serving(tiny_artifact: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "quench", "serve", str(tiny_artifact), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert res.returncode == 1
    assert "serving" not in res.stderr
    assert f"port {port} is already in use" in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_cli_serves_two_builds_of_one_model_by_name(tiny_artifact: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "quench", "serve", "--quiet", "--port", str(port)),
            f"fast={tiny_artifact}",
            f"exact={tiny_artifact}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}")
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("POST", "/v2/repository/index", b"{}")
        index = json.loads(c.getresponse().read())
        assert sorted(e["name"] for e in index) == ["exact", "fast"]
        for n in ("fast", "exact"):
            c.request("POST", f"/v2/models/{n}/infer", infer_json(np.zeros((1, *SHAPE), "f4")))
            r = c.getresponse()
            assert r.status == 200, r.read()
            assert json.loads(r.read())["model_name"] == n
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert proc.returncode == 0


def test_cli_same_name_twice_says_how_to_name_them(tiny_artifact: Path) -> None:
    from typer.testing import CliRunner

    from quench.cli import app

    port = free_port()
    res = CliRunner().invoke(
        app, ["serve", str(tiny_artifact), str(tiny_artifact), "--port", str(port)]
    )
    assert res.exit_code == 1
    assert "two models are named" in res.output
    assert "NAME=" in res.output
