"""What the bench scripts share, in one place:

- processes: running ``quench`` as a user does (timed), running any command with its log
  (``Runner``), a local ``quench serve`` (ports, readiness, stopping it, v2 requests);
- rounds: timing several things in interleaved rounds, the order rotating;
- machine facts: OS, RAM, package versions, git revision, load average;
- Markdown: table rows and cells, and writing a script's section of BENCHMARKS.md between its
  own markers (the rest of the file kept as it is).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TypeVar

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
T = TypeVar("T")


def to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- processes --------------------------------------------------------------------------------
def timed_quench(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """``quench ARGS`` in its own process, timed as a whole command: (seconds, the result)."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "quench", *args], env=env, capture_output=True, text=True
    )
    return time.perf_counter() - t0, done


def rel(p: Path | str) -> str:
    """A path as written in commands: relative to the repo root (the subprocesses' cwd)."""
    p = Path(p).absolute()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def first_error(text: str) -> str:
    """The last line of ``text`` that reads as an error (else its last line), cut to 400."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"(error\b|\w*(Error|Exception)\b)", ln, re.IGNORECASE) or "[ ERROR ]" in ln:
            return ln[:400]
    return (lines[-1] if lines else "no output")[:400]


@dataclass
class Proc:
    """A command ``Runner`` ran: its line, exit code, output, seconds and log file."""

    cmd: str
    rc: int | None  # None: timed out or could not start
    out: str  # stdout + stderr
    seconds: float
    log: str
    stdout: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def error(self) -> str:
        if self.rc is None:
            return first_error(self.out)
        return f"exit {self.rc}: {first_error(self.out)}"


class Runner:
    """Runs commands from the repo root with a timeout, each logged to ``WORK/logs/NNN-name``;
    a failure is said (``say``), never raised."""

    def __init__(
        self,
        work: Path,
        env: dict[str, str],
        counter: Iterator[int] | None = None,
        say: Callable[[str], None] = to_stderr,
    ) -> None:
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.counter = counter or itertools.count(1)
        self.say = say
        self.prefix = " ".join(f"{k}={v}" for k, v in env.items() if k == "ONEDNN_MAX_CPU_ISA")

    def with_env(self, **extra: str) -> Runner:
        """The same runner (one log numbering) with more environment variables."""
        return Runner(self.work, {**self.env, **extra}, self.counter, self.say)

    def run(self, name: str, cmd: list[str], timeout: float) -> Proc:
        count = next(self.counter)
        log = self.logs / f"{count:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"
        text = f"{self.prefix} {shlex.join(cmd)}".strip()
        t = time.perf_counter()
        try:
            p = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        except OSError as exc:
            proc = Proc(text, None, f"error: cannot start: {exc}", 0.0, rel(log))
        else:
            try:
                out, errs = p.communicate(timeout=timeout)
                rc: int | None = p.returncode
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, errs = p.communicate()
                errs += f"\nerror: timed out after {timeout:.0f} s"
                rc = None
            both = f"{out}\n{errs}" if out and errs else out or errs
            proc = Proc(text, rc, both, time.perf_counter() - t, rel(log), out)
        log.write_text(f"$ {text}\n# rc={proc.rc} seconds={proc.seconds:.1f}\n{proc.out}")
        if not proc.ok:
            self.say(f"  FAILED ({proc.error()}); log {proc.log}")
        return proc


# -- rounds -----------------------------------------------------------------------------------
def rotating_rounds(
    names: Sequence[str], rounds: int, measure: Callable[[str], T]
) -> dict[str, list[T]]:
    """``measure`` every name once per round, for ``rounds`` rounds; round r starts at the r-th
    name (so none is always first), and round r of each name is measured close in time to
    round r of the others: ratios paired by round cancel the machine's slow drifts."""
    got: dict[str, list[T]] = {n: [] for n in names}
    for r in range(rounds if names else 0):
        k = r % len(names)
        for n in [*names[k:], *names[:k]]:
            got[n].append(measure(n))
    return got


# -- machine facts ----------------------------------------------------------------------------
def os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))}, kernel {platform.release()}"
    except OSError:
        pass
    return platform.platform()


def ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def ov_version() -> str:
    """OpenVINO's version without its build suffix."""
    return version("openvino").split("-")[0]


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{rev}{' + uncommitted changes' if dirty else ''}" if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_line() -> str:
    """``MODEL, N cores (FLAGS)``: the CPU as the scripts' sections name it."""
    from quench.hw import cpu_info  # here: the serve scripts and a test import common without it

    info = cpu_info()
    flags = ", ".join(info.get("flags", []))
    return f"{info.get('model', 'unknown CPU')}, {os.cpu_count()} cores ({flags})"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# -- Markdown ---------------------------------------------------------------------------------
def fmt(v: float | None, digits: int = 1) -> str:
    """A number for a table cell (thousands separated); a dash for none."""
    return "—" if v is None else f"{v:,.{digits}f}"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.1%}"


def md_row(cells: Sequence[str]) -> str:
    """A Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def write_section(md: Path, mark: str, section: str) -> None:
    """Put ``section`` (which starts and ends with ``mark``) in ``md`` in place of the one
    between the same markers, or at the end."""
    text = md.read_text() if md.exists() else ""
    if mark in text:
        head, _, rest = text.partition(mark)
        _, _, tail = rest.partition(mark)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md.write_text(text)


# -- a local quench serve ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base: str, path: str) -> object:
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return json.loads(r.read())


def get_json_index(base: str) -> list[dict]:
    req = urllib.request.Request(f"{base}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def wait_ready(base: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"error: server at {base} not ready after {timeout:.0f} s")


def random_input(meta: dict, batch: int, seed: int) -> tuple[str, list[int], bytes]:
    """The model's input name, a shape of ``batch`` images and random little-endian FP32."""
    inp = meta["inputs"][0]
    shape = [batch, *(int(d) for d in inp["shape"][1:])]
    x = np.random.default_rng(seed).standard_normal(shape).astype("<f4").tobytes()
    return inp["name"], shape, x


def make_request(meta: dict, batch: int, seed: int) -> tuple[bytes, dict[str, str]]:
    """A v2 HTTP infer request with binary tensor data in and out: (body, headers)."""
    name, shape, x = random_input(meta, batch, seed)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": "FP32",
                    "shape": shape,
                    "parameters": {"binary_data_size": len(x)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return header + x, {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the server; kill it if it has not exited within ``timeout`` s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def answers_by_status(base: str, method: str | None = None) -> dict[str, int]:
    """quench_requests_total summed by status (what the server itself answered); ``method``:
    only that method's (``GRPC``: the gRPC answers, by status code name)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("quench_requests_total{") and (
            method is None or f'method="{method}"' in line
        ):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            out[status] = out.get(status, 0) + int(float(line.split()[-1]))
    return out


def mutations(data: bytes, n: int, rng: np.random.Generator) -> Iterator[bytes]:
    """``n`` malformed variants of a valid message: bytes flipped, cut, spliced in, or random."""
    for i in range(n):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:
            for pos in rng.integers(0, len(b), rng.integers(1, 9)):
                b[pos] = int(rng.integers(0, 256))
        elif kind == 1:
            b = b[: int(rng.integers(0, len(b)))]
        elif kind == 2:
            pos = int(rng.integers(0, len(b)))
            b[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
        else:
            b = bytearray(rng.bytes(int(rng.integers(0, 256))))
        yield bytes(b)
