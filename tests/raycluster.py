"""Ray clusters for the tests, made the way a user makes them: token authentication
(``RAY_AUTH_MODE=token`` with a token file), one local instance per test run, and a two-node
cluster on this machine (``ray start --head`` plus ``ray start --address``, one CPU each).

Ray registers a node started with ``--node-ip-address 127.0.0.1`` on this machine's own address
(it refuses to advertise loopback): traffic to it stays on this machine. Clusters are torn down
by process: ``ray stop`` would stop every Ray process on the machine, other clusters included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def auth_env(folder: Path) -> dict[str, str]:
    """Token authentication as a user sets it up: a token file every node and client reads."""
    token = folder / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def cluster_env(folder: Path) -> dict[str, str]:
    """The environment of cluster processes and clients: auth, and this checkout's quench
    (on a real cluster, quench is installed on every node)."""
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        **auth_env(folder),
        "PYTHONPATH": path,
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def _ray(args: list[str], env: dict[str, str]) -> None:
    exe = Path(sys.executable).with_name("ray")
    cmd = [str(exe) if exe.exists() else shutil.which("ray") or "ray", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:2])} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )


def _processes_of(marks: list[str]) -> list[object]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if any(m in cmd for m in marks):
            found.append(p)
    for p in list(found):
        with suppress(psutil.Error):
            found.extend(p.children(recursive=True))
    return found


def stop(marks: list[str]) -> None:
    """Stop the processes of one cluster (their command lines name its temp dir or GCS port)."""
    import psutil

    procs = {p.pid: p for p in _processes_of(marks) if p.pid != os.getpid()}
    for p in procs.values():
        with suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
    for p in alive:
        with suppress(psutil.Error):
            p.kill()


def start_cluster(temp: Path, cpus: list[int], env: dict[str, str]) -> tuple[str, list[str]]:
    """A head node and more nodes on this machine, ``cpus[i]`` CPUs each, all joined; returns
    (address, marks for :func:`stop`). Stops what it started if a node does not come up."""
    port = free_port()
    marks = [str(temp), f":{port}"]
    try:
        _ray(
            [
                "start",
                "--head",
                "--num-cpus",
                str(cpus[0]),
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--temp-dir",
                str(temp),
                "--include-dashboard",
                "false",
                "--dashboard-port",
                str(free_port()),
                "--ray-client-server-port",
                str(free_port()),
                "--disable-usage-stats",
            ],
            env,
        )
        address = f"127.0.0.1:{port}"
        for n in cpus[1:]:
            _ray(
                [
                    "start",
                    "--address",
                    address,
                    "--num-cpus",
                    str(n),
                    "--node-ip-address",
                    "127.0.0.1",
                ],
                env,
            )
        deadline = time.monotonic() + 60
        while _alive_nodes(address, env) < len(cpus):
            if time.monotonic() > deadline:
                raise RuntimeError("a node did not join the cluster")
            time.sleep(1)
    except BaseException:
        stop(marks)
        raise
    return address, marks


@contextmanager
def two_nodes() -> Iterator[tuple[str, dict[str, str]]]:
    """A head and a worker node on this machine, one CPU each; yields (address, client env)."""
    # a short folder: Ray's socket paths under it must stay within 107 characters
    folder = Path(tempfile.mkdtemp(prefix="quench-ray-"))
    env = cluster_env(folder)
    address, marks = start_cluster(folder / "ray", [1, 1], env)
    try:
        yield address, env
    finally:
        stop(marks)
        shutil.rmtree(folder, ignore_errors=True)


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    code = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        return int(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0
