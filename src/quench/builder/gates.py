"""The fidelity gate of every build (top-1 agreement with fp32 on held-out images, else a
random batch) and the build's last word when a gate fails: nothing written, and what to try."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from quench.errors import QuenchError
from quench.precision import Precision
from quench.selfcheck import FidelityError, fidelity

if TYPE_CHECKING:
    from collections.abc import Callable

    from quench.builder.core import BuildOptions, Probe
    from quench.model import Model

    Log = Callable[[str], None]


def not_written(exc: QuenchError, opts: BuildOptions) -> QuenchError:
    """The build's final word on a failed gate: nothing written, and what to try."""
    written = "artifact not written"
    if isinstance(exc, FidelityError):
        written += f". {fidelity_hint(opts)}"
    return type(exc)(f"{exc}; {written}")


def fidelity_gate(
    built: Model, probe: Probe, opts: BuildOptions, say: Log
) -> tuple[dict[str, Any], np.ndarray]:
    """Fidelity of ``built`` against fp32 on the probe images, and its outputs;
    :class:`FidelityError` below the bound."""
    x, source = probe.x, probe.source
    got = built.predict(x)
    figures = fidelity(got, probe.reference)
    result = {
        "images": len(x),
        "source": source,
        **figures,
        "min_top1_agreement": opts.min_top1_agreement,
        "passed": figures["top1_agreement"] >= opts.min_top1_agreement,
    }
    say(
        f"fidelity on {len(x)} {source}: top-1 agreement with fp32 "
        f"{figures['top1_agreement']:.1%}, output SQNR {figures['sqnr_db']:.1f} dB"
        + ("" if result["passed"] else f" (bound {opts.min_top1_agreement:.0%})")
    )
    if not result["passed"]:
        raise FidelityError(
            f"fidelity check failed: top-1 agreement with fp32 {figures['top1_agreement']:.1%} "
            f"on {len(x)} {source}, below --min-top1-agreement {opts.min_top1_agreement:g}"
        )
    return result, got


def fidelity_hint(opts: BuildOptions) -> str:
    """What to try after a failed fidelity check."""
    tries = []
    if Precision.parse(opts.precision).is_int8:
        if opts.target == "native":
            tries.append("--target portable")
        if not opts.float_first_layer:
            tries.append("--float-first-layer")
        tries.append("another --calib-method")
    if opts.engine == "auto":
        tries.append("--engine onnxruntime or openvino")
    tries.append("a higher precision")
    return "Try " + ", ".join(tries) + " (or lower --min-top1-agreement if this is expected)."
