"""Run the app with uvicorn (and the gRPC listener on the same event loop): the port bound
first, our HTTP protocol and limits, graceful shutdown of both on SIGTERM / Ctrl-C, exit code 0
on SIGTERM."""

from __future__ import annotations

import errno
import functools
import signal
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import uvicorn

from quench.serve.app import create_app
from quench.serve.config import ServeConfig
from quench.serve.errors import CannotListen
from quench.serve.protocol import QuenchH11Protocol

if TYPE_CHECKING:
    from quench.model import Model
    from quench.serve.grpc import GrpcListener


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


class Server(uvicorn.Server):
    """uvicorn's server, with the gRPC listener (if any) started once the models are warm and
    stopped as soon as shutdown begins; the app answers its RPCs before closing the batchers."""

    def __init__(self, config: uvicorn.Config, grpc: GrpcListener | None = None) -> None:
        super().__init__(config)
        self.grpc = grpc
        self.grpc_error: CannotListen | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.grpc is not None and self.started and not self.should_exit:
            try:
                await self.grpc.start()
            except CannotListen as exc:
                self.grpc_error = exc
                self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc is not None:
            self.grpc.stop()  # refuses new RPCs now, while HTTP drains
        await super().shutdown(sockets)


def build(
    app: Any,
    config: ServeConfig,
    host: str,
    port: int,
    grpc_port: int | None = None,
    log: bool = True,
) -> Server:
    """The server for ``app`` on ``host:port``, with gRPC on ``grpc_port`` when given."""
    listener = None
    if grpc_port is not None:
        from quench.serve.grpc import GrpcListener

        listener = GrpcListener(app.state, host, grpc_port, log)
    return Server(uvicorn_config(app, config, host=host, port=port), listener)


def run(
    models: Sequence[Model],
    config: ServeConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    names: Sequence[str | None] | None = None,
    sock: socket.socket | None = None,
    grpc_port: int | None = None,
) -> None:
    """Serve ``models`` until SIGTERM/SIGINT; in-flight and queued requests are answered first.

    ``sock``: already bound by ``listen(host, port)`` (the CLI binds before loading models).
    ``grpc_port``: also serve the v2 gRPC protocol there (same models, batchers and limits).
    """
    config = config or ServeConfig()
    app = create_app(models, config, names)
    if sock is None:  # before saying "serving": a busy port is an error, not a log line
        sock = listen(host, port)
    server = build(app, config, host, port, grpc_port, log=not config.quiet)
    served = ", ".join(app.state.served)
    where = f"http://{host}:{port}" + (f" and grpc://{host}:{grpc_port}" if grpc_port else "")
    # uvicorn re-raises the signal it caught once it has shut down; SIGTERM is a normal stop
    # here (exit 0), so the handler it restores and re-raises into does nothing.
    if sys.platform != "win32":
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        if not config.quiet:
            print(f"quench: serving {served} on {where}", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if sys.platform != "win32":
            signal.signal(signal.SIGTERM, previous)
    if server.grpc_error is not None:
        raise server.grpc_error
    if not server.started:
        raise SystemExit(1)
