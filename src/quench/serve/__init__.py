"""``quench serve``: a KServe v2 / Open Inference Protocol HTTP server with dynamic batching.

``create_app(models, config)`` builds the ASGI app; ``run(...)`` serves it with uvicorn.
"""

from __future__ import annotations

from quench.serve.app import create_app
from quench.serve.config import ServeConfig
from quench.serve.server import run

__all__ = ["ServeConfig", "create_app", "run"]
