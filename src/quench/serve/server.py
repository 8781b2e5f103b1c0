"""Run the app with uvicorn: the port bound first, our HTTP protocol and limits, graceful
shutdown on SIGTERM / Ctrl-C, exit code 0 on SIGTERM."""

from __future__ import annotations

import errno
import functools
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from quench.serve.app import create_app
from quench.serve.config import ServeConfig
from quench.serve.errors import CannotListen
from quench.serve.protocol import QuenchH11Protocol

if TYPE_CHECKING:
    import uvicorn

    from quench.model import Model


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it), or CannotListen in one line."""
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, OverflowError) as exc:
        raise CannotListen(f"cannot listen on {where}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CannotListen(f"cannot listen on {where}: port {port} is already in use") from None
        raise CannotListen(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: Any, config: ServeConfig, **kwargs: Any) -> uvicorn.Config:
    """uvicorn settings for ``app``: Quench's HTTP protocol, timeouts and log level."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=functools.partial(QuenchH11Protocol, limits=config),  # type: ignore[arg-type]
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_keep_alive=config.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=int(config.timeout_s + 5),
        **kwargs,
    )


def run(
    models: Sequence[Model],
    config: ServeConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    names: Sequence[str | None] | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Serve ``models`` until SIGTERM/SIGINT; in-flight and queued requests are answered first.

    ``sock``: already bound by ``listen(host, port)`` (the CLI binds before loading models).
    """
    import uvicorn

    config = config or ServeConfig()
    app = create_app(models, config, names)
    if sock is None:  # before saying "serving": a busy port is an error, not a log line
        sock = listen(host, port)
    server = uvicorn.Server(uvicorn_config(app, config, host=host, port=port))
    served = ", ".join(app.state.served)
    # uvicorn re-raises the signal it caught once it has shut down; SIGTERM is a normal stop
    # here (exit 0), so the handler it restores and re-raises into does nothing.
    if sys.platform != "win32":
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        if not config.quiet:
            print(f"quench: serving {served} on http://{host}:{port}", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if sys.platform != "win32":
            signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise SystemExit(1)
