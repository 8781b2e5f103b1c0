"""Model download: cache, resume, verification and failures, against a local HTTP server."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from quench import progress
from quench.errors import FetchError
from quench.presets import Preset, get_preset
from quench.zoo import fetch
from quench.zoo.fetch import cache_dir, fetch_model, sha256_file


def _model_bytes(input_name: str = "data", output_name: str = "resnetv17_dense0_fwd") -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", [input_name], [output_name])],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model.doc_string = "padding so the file splits into two real halves " * 4
    onnx.checker.check_model(model)
    return model.SerializeToString()


MODEL = _model_bytes()


class Server:
    """A threaded HTTP server on 127.0.0.1 serving ``body`` at every path.

    ``mode``: "range" honours Range (206), "plain" ignores it (200), "cut" announces the whole
    length but closes after half, "status" answers ``status`` with no body.
    """

    def __init__(self) -> None:
        self.body = MODEL
        self.mode = "range"
        self.status = 404
        self.requests: list[str | None] = []  # the Range header of each request
        self.sent: list[int] = []  # body bytes sent per request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resnet50-v1-7.onnx"

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        self.requests.append(rng)
        body = self.body
        if self.mode == "status":
            self.sent.append(0)
            h.send_error(self.status)
            return
        if self.mode == "range" and rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            payload = body[start:]
        else:
            h.send_response(200)
            payload = body if self.mode != "cut" else body[: len(body) // 2]
        h.send_header("Content-Length", str(len(body) if self.mode == "cut" else len(payload)))
        h.end_headers()
        self.sent.append(len(payload))  # before writing: the client may finish first
        h.wfile.write(payload)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUENCH_CACHE", str(tmp_path / "cache"))
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def _preset(body: bytes = MODEL, **changes: object) -> Preset:
    return dataclasses.replace(get_preset("resnet50-v1-7"), size=len(body), **changes)


def _dest() -> Path:
    return cache_dir() / "models" / "resnet50-v1-7.onnx"


def _part() -> Path:
    return _dest().with_name("resnet50-v1-7.onnx.part")


def _fetch(server: Server, preset: Preset | None = None, **kw: object) -> fetch.FetchResult:
    return fetch_model(preset or _preset(), url=server.url, timeout=5, progress=False, **kw)


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("QUENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "quench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "quench"


def test_download(server: Server) -> None:
    res = _fetch(server)
    sha = hashlib.sha256(MODEL).hexdigest()
    assert res.path == _dest() and res.path.read_bytes() == MODEL
    assert (res.sha256, res.size, res.url, res.cached) == (sha, len(MODEL), server.url, False)
    sidecar = _dest().with_name("resnet50-v1-7.onnx.sha256")
    assert sidecar.read_text() == f"{sha}  resnet50-v1-7.onnx\n"
    assert sha256_file(res.path) == sha
    assert not _part().exists()
    assert server.requests == [None]


def test_second_call_is_cached(server: Server) -> None:
    _fetch(server)
    res = _fetch(server)
    assert res.cached and res.path.read_bytes() == MODEL
    assert len(server.requests) == 1
    res = _fetch(server, force=True)
    assert not res.cached and len(server.requests) == 2


def test_corrupted_cache_is_downloaded_again(server: Server) -> None:
    _fetch(server)
    _dest().write_bytes(MODEL[:-1] + b"\0")  # same size, sha no longer matches the sidecar
    res = _fetch(server)
    assert not res.cached and res.path.read_bytes() == MODEL
    assert len(server.requests) == 2


def test_file_put_in_cache_by_hand_is_used(server: Server) -> None:
    _dest().parent.mkdir(parents=True)
    _dest().write_bytes(MODEL)
    res = fetch_model(_preset(url=None), progress=False)
    assert res.cached and res.sha256 == hashlib.sha256(MODEL).hexdigest()
    assert _dest().with_name("resnet50-v1-7.onnx.sha256").exists()
    assert server.requests == []


def test_size_mismatch(server: Server) -> None:
    preset = _preset(MODEL + b"x")
    with pytest.raises(FetchError, match=rf"{len(MODEL)} bytes.*expected {len(MODEL) + 1}"):
        _fetch(server, preset)
    assert not _dest().exists() and not _part().exists()


def test_sha256_mismatch(server: Server) -> None:
    with pytest.raises(FetchError, match=r"sha256 .* expected 0+$"):
        _fetch(server, _preset(sha256="0" * 64))
    assert not _dest().exists() and not _part().exists()


def test_not_onnx(server: Server) -> None:
    server.body = b"<html>not a model</html>".ljust(len(MODEL), b" ")
    with pytest.raises(FetchError, match="not a valid ONNX model") as exc:
        _fetch(server)
    assert "\n" not in str(exc.value)
    assert not _dest().exists() and not _part().exists()


def test_wrong_input_name(server: Server) -> None:
    server.body = _model_bytes(input_name="images")
    with pytest.raises(FetchError, match=r"no input named 'data'.*images"):
        _fetch(server, _preset(server.body))
    assert not _dest().exists() and not _part().exists()


def test_resume_with_range(server: Server) -> None:
    half = len(MODEL) // 2
    _part().parent.mkdir(parents=True)
    _part().write_bytes(MODEL[:half])
    res = _fetch(server)
    assert res.path.read_bytes() == MODEL and not _part().exists()
    assert server.requests == [f"bytes={half}-"]
    assert server.sent == [len(MODEL) - half]


def test_resume_ignored_restarts(server: Server) -> None:
    server.mode = "plain"
    _part().parent.mkdir(parents=True)
    _part().write_bytes(b"garbage!" * 4)
    res = _fetch(server)
    assert res.path.read_bytes() == MODEL and not _part().exists()
    assert server.sent == [len(MODEL)]


def test_interrupted_keeps_part(server: Server) -> None:
    server.mode = "cut"
    with pytest.raises(FetchError, match=rf"closed after \d+ of {len(MODEL)} bytes.*--model"):
        _fetch(server)
    assert not _dest().exists()
    assert _part().read_bytes() == MODEL[: len(MODEL) // 2]
    server.mode = "range"  # the next try resumes where it stopped
    res = _fetch(server)
    assert res.path.read_bytes() == MODEL
    assert server.requests[-1] == f"bytes={len(MODEL) // 2}-"


def test_unreachable_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/m.onnx"
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"cannot download resnet50-v1-7 from .*--model") as exc:
        fetch_model(_preset(), url=url, timeout=3, progress=False)
    assert time.monotonic() - start < 3
    assert url in str(exc.value) and str(_dest()) in str(exc.value)


def test_http_404(server: Server) -> None:
    server.mode = "status"
    with pytest.raises(FetchError, match="HTTP 404"):
        _fetch(server)
    assert not _dest().exists() and not _part().exists()


def test_preset_without_url() -> None:
    with pytest.raises(FetchError, match=r"no download URL.*--model"):
        fetch_model("efficientnet-lite0", progress=False)


def test_progress_bar(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "stderr_is_tty", lambda: True)
    res = fetch_model(_preset(), url=server.url, timeout=5, progress=True)
    assert res.path.read_bytes() == MODEL
