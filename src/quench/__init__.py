"""Quench: build an ONNX image classifier into a fast deployable artifact; classify,
evaluate, benchmark and serve it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from quench.model import Model

__all__ = ["Model", "QuenchError", "__version__", "build", "load"]

from quench.errors import QuenchError
from quench.telemetry import opt_out as _opt_out

_opt_out()  # before any engine is imported: no usage data leaves this process


def load(path: str, **options: Any) -> Model:
    """Load a ``.quench`` artifact (see ``quench.model.Model``)."""
    from quench.model import Model

    return Model.load(path, **options)


def build(model: str, output: str, **options: Any) -> Model:
    """Build an ONNX model into a ``.quench`` artifact (see ``quench.builder.build``)."""
    from quench.builder import build as _build

    return _build(model, output, **options)


def __getattr__(name: str) -> Any:
    if name == "Model":
        from quench.model import Model

        return Model
    raise AttributeError(name)
