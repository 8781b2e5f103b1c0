"""``quench serve --ray``: the same KServe v2 app (``quench.serve.create_app``) as Ray Serve
replicas. Each replica loads the artifacts shipped through the object store and runs the app,
with its own dynamic batcher; Ray Serve's proxy spreads requests over the replicas, and adds or
removes replicas between ``--autoscale MIN:MAX`` on the requests in flight.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quench import signing
from quench.artifact import load as load_artifact
from quench.errors import QuenchError
from quench.ray.cluster import (
    connect,
    free_cpus,
    load_shipped,
    plan_pool,
    put_artifact,
    raw_keys,
)
from quench.serve import ServeConfig, create_app

APP = "quench"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Replica:
    """One Ray Serve replica: the artifacts, loaded once, behind ``quench.serve``'s app."""

    def __init__(
        self,
        holders: list[list[Any]],
        names: list[str],
        config: ServeConfig,
        threads: int,
        check: str,
        served: list[str | None] | None = None,
        trusted_keys: dict[str, bytes] | None = None,
    ) -> None:
        self.models = [
            load_shipped(h, n, threads, check, trusted_keys)
            for h, n in zip(holders, names, strict=True)
        ]
        self.config, self.served = config, served

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.models, self.config, self.served)


@dataclass
class Scale:
    """``replicas`` fixed, or ``autoscale`` (min, max) replicas."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None

    @classmethod
    def parse(cls, replicas: int | None, autoscale: str | None) -> Scale:
        if replicas is not None and autoscale is not None:
            raise QuenchError("--replicas and --autoscale exclude each other")
        if autoscale is None:
            return cls(replicas or 1)
        try:
            lo, hi = (int(v) for v in autoscale.split(":"))
        except ValueError:
            raise QuenchError(f"--autoscale takes MIN:MAX, e.g. 1:4, got {autoscale!r}") from None
        if not 0 <= lo <= hi or hi < 1:
            raise QuenchError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {autoscale!r}")
        return cls(lo, (lo, hi))

    @property
    def first(self) -> int:
        """Replicas started at once."""
        return max(self.autoscale[0], 1) if self.autoscale else self.replicas


def application(
    artifacts: Sequence[str | Path],
    config: ServeConfig,
    scale: Scale,
    threads: int | None = None,
    check: str = "always",
    names: Sequence[str | None] | None = None,
    trusted_keys: dict[str, Any] | None = None,
) -> Any:
    """The Ray Serve application (bind it with ``serve.run``): every artifact in each replica,
    served under ``names`` (None: as ``quench serve`` names them). With ``trusted_keys``
    (:func:`quench.signing.trusted_keys`) each replica refuses an artifact not signed by one of
    them (:func:`start` checks them first, before anything is deployed)."""
    ray = connect(None)
    from ray import serve

    # sized for the replicas started now: those that autoscaling adds wait for room if need be
    _, per_replica, reserve = plan_pool(free_cpus(ray), scale.first)
    threads = threads or per_replica
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": reserve},
        # every request reaches the app, whose own queue answers 503 when full
        "max_ongoing_requests": config.max_queue,
        "graceful_shutdown_timeout_s": config.timeout_s + 5,
    }
    if scale.autoscale:
        lo, hi = scale.autoscale
        options["autoscaling_config"] = {
            "min_replicas": lo,
            "initial_replicas": scale.first,
            "max_replicas": hi,
            "target_ongoing_requests": config.max_batch,  # a full batch in flight per replica
        }
    else:
        options["num_replicas"] = scale.replicas
    keys = None if trusted_keys is None else raw_keys(trusted_keys)
    deployment = serve.deployment(serve.ingress()(Replica), name="quench", **options)
    holders = [put_artifact(a) for a in artifacts]
    served = list(names) if names is not None else None
    return deployment.bind(
        holders, [str(a) for a in artifacts], config, threads, check, served, keys
    )


def start(
    artifacts: Sequence[str | Path],
    config: ServeConfig,
    scale: Scale,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = "auto",
    threads: int | None = None,
    check: str = "always",
    names: Sequence[str | None] | None = None,
    trusted_keys: dict[str, Any] | None = None,
) -> str:
    """Deploy on the cluster at ``address`` and wait until every replica is ready; returns the
    URL. A proxy bound to a loopback host runs on the head node only (one per machine);
    otherwise Ray Serve runs one on every node."""
    for a in artifacts if trusted_keys is not None else []:
        signing.verify(load_artifact(a), dict(trusted_keys or {}), str(a))
    connect(address)
    from ray import serve

    serve.start(
        http_options={"host": host, "port": port},
        proxy_location="HeadOnly" if host in LOOPBACK else "EveryNode",
    )
    _check_proxy(host, port)
    app = application(artifacts, config, scale, threads, check, names, trusted_keys)
    try:
        serve.run(app, name=APP, route_prefix="/")
    except Exception as exc:
        reason = " ".join(str(exc).split())[:500] or type(exc).__name__
        raise QuenchError(f"Ray Serve could not deploy {APP!r}: {reason}") from None
    return f"http://{host}:{port}"


def _check_proxy(host: str, port: int) -> None:
    """Ray Serve keeps the HTTP options of its first start on a cluster: one already running
    elsewhere would take the app on its own address, not the one asked for."""
    try:
        from ray.serve.context import _get_global_client

        cfg = _get_global_client().http_config
    except Exception:  # a private API: when it moves, deploy as asked
        return
    if (cfg.host, int(cfg.port)) != (host, port):
        raise QuenchError(
            f"Ray Serve already runs on this cluster with its HTTP proxy at {cfg.host}:"
            f"{cfg.port}: pass --host {cfg.host} --port {cfg.port}, or stop it first "
            "(`serve shutdown`)"
        )


def stop() -> None:
    """Delete the application: Ray Serve stops routing to its replicas, each answers what it
    has accepted (its app drains its batcher), then exits."""
    from ray import serve

    serve.delete(APP)


def run(
    artifacts: Sequence[str | Path],
    config: ServeConfig,
    scale: Scale,
    host: str,
    port: int,
    address: str | None,
    threads: int | None = None,
    check: str = "always",
    log: Callable[[str], None] = print,
    names: Sequence[str | None] | None = None,
    trusted_keys: dict[str, Any] | None = None,
) -> None:
    """Serve until SIGTERM or Ctrl-C, then shut down gracefully."""
    connect(address)  # Ray sets its own SIGTERM handler (exit at once) as it connects
    stopping = threading.Event()
    previous = {
        s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        url = start(
            artifacts, config, scale, host, port, address, threads, check, names, trusted_keys
        )
        how = (
            f"autoscaling {scale.autoscale[0]}-{scale.autoscale[1]} replicas"
            if scale.autoscale
            else f"{scale.replicas} replica(s)"
        )
        log(f"quench: serving on {url} with Ray Serve, {how}")
        while not stopping.wait(0.5):
            pass
        log("quench: stopping (answering accepted requests)")
        stop()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
