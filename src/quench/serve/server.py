"""Run the app with uvicorn: graceful shutdown on SIGTERM / Ctrl-C, exit code 0 on SIGTERM."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from quench.serve.app import create_app
from quench.serve.config import ServeConfig

if TYPE_CHECKING:
    from quench.model import Model


def run(
    models: Sequence[Model],
    config: ServeConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Serve ``models`` until SIGTERM/SIGINT; in-flight and queued requests are answered first."""
    import uvicorn

    config = config or ServeConfig()
    app = create_app(models, config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=config.timeout_s + 5,
        )
    )
    names = ", ".join(app.state.served)
    # uvicorn re-raises the signal it caught once it has shut down; SIGTERM is a normal stop
    # here (exit 0), so the handler it restores and re-raises into does nothing.
    if sys.platform != "win32":
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        if not config.quiet:
            print(f"quench: serving {names} on http://{host}:{port}", file=sys.stderr, flush=True)
        server.run()
    finally:
        if sys.platform != "win32":
            signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise SystemExit(1)
