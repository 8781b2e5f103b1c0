"""``bench/load.py --mixed``: valid and hostile traffic against ``quench serve``, then SIGTERM.

Each client cycles through request kinds (valid binary infer, valid classify, malformed JSON
fields, an unparsable request line, a body abandoned half-way, an oversized Content-Length, an
image over the pixel limit), keeping its keep-alive connection where the server keeps it.
"""

from __future__ import annotations

import collections
import http.client
import io
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from common import free_port, get_json, get_json_index, make_request, wait_ready
from PIL import Image

Kind = tuple[str, str, bytes, dict[str, str]]  # name, path, body, headers


def kinds(meta: dict, name: str) -> list[Kind]:
    body, headers = make_request(meta, 1, 0)
    infer = f"/v2/models/{name}/infer"
    classify = f"/v2/models/{name}/classify"
    hlen = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:hlen])
    head["inputs"][0]["parameters"]["binary_data_size"] = float(len(body) - hlen)
    bad_size = json.dumps(head).encode()
    head["inputs"][0]["parameters"] = [1]
    bad_params = json.dumps(head).encode()
    photo, huge = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (640, 480), (30, 160, 90)).save(photo, "JPEG")
    Image.new("L", (9400, 9400), 7).save(huge, "PNG")
    return [
        ("infer", infer, body, headers),
        ("infer", infer, body, headers),
        ("infer", infer, body, headers),
        ("classify", classify, photo.getvalue(), {}),
        ("float binary_data_size", infer, bad_size + body[hlen:], _hlen(bad_size)),
        ("parameters list", infer, bad_params + body[hlen:], _hlen(bad_params)),
        ("not JSON", infer, b"{nope", {}),
        ("over the pixel limit", classify, huge.getvalue(), {}),
        ("garbage request line", "", b"GARBAGE /\r\n\r\n", {}),
        ("abandoned body", infer, body[: len(body) // 2], {"Content-Length": str(len(body))}),
        ("oversized Content-Length", infer, b"", {"Content-Length": "50000000"}),
    ]


def _hlen(header: bytes) -> dict[str, str]:
    return {"Inference-Header-Content-Length": str(len(header))}


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: collections.Counter[str] = collections.Counter()  # "kind status"
        self.logged: collections.Counter[int] = collections.Counter()  # statuses in the log
        self.failures: collections.Counter[str] = collections.Counter()  # "kind error"

    def answer(self, kind: str, status: int, in_log: bool) -> None:
        with self.lock:
            self.answers[f"{kind} {status}"] += 1
            if in_log:
                self.logged[status] += 1

    def fail(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.failures[f"{kind}: {type(exc).__name__}"] += 1


def raw(port: int, data: bytes) -> int:
    """Send ``data`` on a fresh connection; the status of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        head = s.recv(65536)
    if not head:
        raise ConnectionError("closed without an answer")
    return int(head.split(b" ", 2)[1])


def client(port: int, plan: list[Kind], start: int, until: list[float], tally: Tally) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = start
    while time.monotonic() < until[0]:
        kind, path, body, headers = plan[i % len(plan)]
        i += 1
        try:
            if kind == "garbage request line":
                tally.answer(kind, raw(port, body), in_log=False)
            elif kind == "abandoned body":
                with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                    s.sendall(
                        f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                        f"Content-Length: {headers['Content-Length']}\r\n\r\n".encode()
                        + body
                    )
                # counted by the server as 499; nothing comes back
            elif kind == "oversized Content-Length":
                head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n"
                tally.answer(kind, raw(port, head.encode()), in_log=True)
            else:
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
                tally.answer(kind, resp.status, in_log=True)
                if resp.getheader("connection") == "close":
                    conn.close()
        except (OSError, http.client.HTTPException) as exc:
            tally.fail(kind, exc)
            conn.close()
            time.sleep(0.01)
    conn.close()


class Traffic:
    """n clients for ``seconds`` (``stop()`` ends them early)."""

    def __init__(self, port: int, plan: list[Kind], n: int, seconds: float, tally: Tally) -> None:
        self.until = [time.monotonic() + seconds]
        self.threads = [
            threading.Thread(target=client, args=(port, plan, 5 * c, self.until, tally))
            for c in range(n)
        ]
        for t in self.threads:
            t.start()

    def running(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def stop(self) -> None:
        self.until[0] = time.monotonic()
        self.join()

    def join(self) -> None:
        for t in self.threads:
            t.join(120)


def run_mixed(artifact: str, clients: int, duration: float, serve_args: list[str]) -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    cmd = [sys.executable, "-m", "quench", "serve", artifact, "--port", str(port), *serve_args]
    server = subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL)
    proc = psutil.Process(server.pid)
    tally = Tally()
    try:
        wait_ready(base, timeout=300)
        name = get_json_index(base)[0]["name"]
        plan = kinds(get_json(base, f"/v2/models/{name}"), name)
        Traffic(port, plan, clients, min(5.0, duration), tally).join()  # warm-up
        time.sleep(3)
        rss_start = proc.memory_info().rss / 2**20
        peak = rss_start
        run = Traffic(port, plan, clients, duration, tally)
        while run.running():
            peak = max(peak, proc.memory_info().rss / 2**20)
            time.sleep(0.1)
        time.sleep(3)
        rss_end = proc.memory_info().rss / 2**20
        last = Traffic(port, plan, clients, 60.0, tally)  # SIGTERM in the middle of it
        time.sleep(2)
        server.send_signal(signal.SIGTERM)
        server.wait(90)
        last.stop()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log.seek(0)
    in_log: collections.Counter[int] = collections.Counter()
    for line in log:  # the traffic's requests (not the set-up's health and metadata ones)
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["path"].endswith(("/infer", "/classify")):
                in_log[entry["status"]] += 1
    Path(log.name).unlink()
    lost = sum(max(n - tally.logged[s], 0) for s, n in in_log.items() if s != 499)
    fives = sum(n for k, n in tally.answers.items() if k.rsplit(" ", 1)[1].startswith("5"))
    fives += sum(n for s, n in in_log.items() if s >= 500)
    result = {
        "clients": clients,
        "seconds": duration,
        "answers": dict(sorted(tally.answers.items())),
        "client_errors": dict(sorted(tally.failures.items())),
        "server_log_by_status": dict(sorted(in_log.items())),
        "server_errors_5xx": fives,
        "lost_accepted": lost,
        "server_exit": server.returncode,
        "rss_mb": {"start": round(rss_start), "peak": round(peak), "end": round(rss_end)},
    }
    print(json.dumps(result, indent=1))
    ok = fives == 0 and lost == 0 and server.returncode == 0 and rss_end <= 1.1 * rss_start
    print("mixed traffic:", "PASS" if ok else "FAIL")
    return 0 if ok else 1
