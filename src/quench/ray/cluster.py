"""Connecting to Ray, sizing the actor pool, and shipping an artifact through the object store."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from quench.errors import QuenchError

if TYPE_CHECKING:
    from quench.model import Model

INSTALL_HINT = 'Ray is not installed: pip install "quench[ray]"'


def require() -> ModuleType:
    """The ``ray`` module, or a one-line QuenchError saying how to install it."""
    try:
        import ray
        import ray.data  # the "data" extra
    except ImportError:
        raise QuenchError(INSTALL_HINT) from None
    return ray


def connect(address: str | None = "auto") -> ModuleType:
    """Join a Ray cluster: ``auto`` (or None) connects to the one running on this machine or at
    ``$RAY_ADDRESS``, else starts a local instance; any other value is a cluster address
    (``HOST:PORT`` or ``ray://HOST:10001``). A process already connected stays connected."""
    ray = require()
    if ray.is_initialized():
        return ray
    target = None if address in (None, "", "auto") else address
    try:
        ray.init(address=target, logging_level=logging.WARNING)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise QuenchError(f"Ray at {address}: cannot connect ({reason})") from None
    return ray


def free_cpus(ray: ModuleType, wait_s: float = 60.0) -> float:
    """The cluster's free CPUs, once steady: actors of a job that just ended are released a
    moment later, so this waits (up to ``wait_s``) for at least one actor's room and for two
    readings half a second apart to agree."""
    deadline = time.monotonic() + wait_s
    last = -1.0
    while True:
        now = float(ray.available_resources().get("CPU", 0.0))
        if (now >= 1 - 2.5 * IO_CPUS and now == last) or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(0.5)


def plan_pool(free: float, actors: int | None = None) -> tuple[int, int, float]:
    """(actors, engine threads per actor, CPUs each actor reserves) for the inference pool.

    By default one single-threaded actor per free CPU. Each actor reserves its threads less
    ``IO_CPUS`` x 2.5 of a CPU, and read and write tasks reserve ``IO_CPUS`` each: an actor pool
    that reserved every CPU would leave Ray no room to schedule the reads that feed it, and the
    job would wait forever (an easy trap on a 2-core machine).
    """
    cpus = max(1, math.floor(free))
    n = actors or cpus
    if n < 1:
        raise QuenchError(f"--actors must be >= 1, got {n}")
    threads = max(1, cpus // n)
    reserve = threads - 2.5 * IO_CPUS
    if n * reserve > free + 1e-9:
        raise QuenchError(
            f"{n} actors need {n * reserve:g} CPUs and the Ray cluster has {free:g} free: "
            "pass fewer --actors (or --replicas), or add nodes"
        )
    return n, threads, reserve


IO_CPUS = 0.1  # a read or write task's CPU reservation: moving bytes; decoding is the actors'


def raw_keys(keys: dict[str, Any]) -> dict[str, bytes]:
    """Ed25519 public keys (:func:`quench.signing.trusted_keys`) as raw bytes, to ship to
    actors (key objects do not pickle)."""
    from cryptography.hazmat.primitives import serialization

    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    return {k: v.public_bytes(*raw) for k, v in keys.items()}


def put_artifact(path: str | Path) -> Any:
    """Check an artifact here (one-line error if it is not one) and put its bytes in Ray's
    object store; returns ``[ObjectRef]`` (a list, so Ray hands the reference itself to actor
    constructors and each actor fetches the bytes once)."""
    from quench.model import Model

    ray = require()
    Model.load(path, check="off").close()  # checksums and manifest, before any actor starts
    return [ray.put(Path(path).read_bytes())]


def load_shipped(
    holder: list[Any],
    name: str,
    threads: int,
    check: str,
    trusted_keys: dict[str, bytes] | None = None,
) -> Model:
    """In an actor: the artifact from the object store, loaded (and self-checked) like a file;
    with ``trusted_keys`` (raw Ed25519 public keys by key id, :func:`raw_keys`) it must be
    signed by one of them, checked here again (:class:`~quench.signing.SignatureError`)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from quench.model import Model

    ray = require()
    data = ray.get(holder[0])
    keys = None
    if trusted_keys is not None:
        keys = {k: Ed25519PublicKey.from_public_bytes(v) for k, v in trusted_keys.items()}
    with tempfile.TemporaryDirectory(prefix="quench-") as tmp:
        local = Path(tmp) / Path(name).name  # error messages name the artifact
        local.write_bytes(data)
        model = Model.load(local, threads=threads, check=check, trusted_keys=keys)
    model.path = Path(name)
    return model
