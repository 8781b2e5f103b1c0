"""How to quantize: :class:`QuantConfig`, its allowed values, and the checks on it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from quench.errors import QuenchError

METHODS = ("minmax", "percentile", "entropy", "mse")
ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_BITS = (7, 8)


@dataclass
class QuantConfig:
    """How to quantize. ``method`` picks the activation ranges (see :data:`METHODS`)."""

    method: str = "percentile"
    percentile: float = 99.999
    bias_correction: bool = True
    # True: the Conv/Gemm reading the model input stays float; False: quantized (on the pixel
    # grid when ``input_grid`` is given and the graph fits); None: on the pixel grid where it
    # fits, else float
    float_first_layer: bool | None = True
    exclude: tuple[str, ...] = ()  # node names kept in float
    # (mean, std) per input channel, in pixel units (0..255), for the pixel grid (see
    # ``first_layer.pixel_grid_first_conv``); that layer's weights are rounded by GPTQ
    input_grid: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    activation_type: str = "uint8"  # or "int8"
    per_channel: bool = True
    # 7: weights in [-64, 64], exact on every CPU (see ``weight_max``); 8: [-127, 127], exact
    # only where int8 products accumulate in int32 (VNNI, AMX, ARM)
    weight_bits: int = 7


def check_config(config: QuantConfig) -> None:
    """Raise :class:`QuenchError` (one line) for a value ``config`` does not allow."""
    if config.method not in METHODS:
        raise QuenchError(
            f"unknown calibration method {config.method!r}; choose one of {', '.join(METHODS)}"
        )
    if config.weight_bits not in WEIGHT_BITS:
        raise QuenchError(f"weight_bits must be 7 or 8, got {config.weight_bits!r}")
    if config.activation_type not in ACTIVATION_TYPES:
        raise QuenchError(
            f"unknown activation type {config.activation_type!r}; "
            f"choose one of {', '.join(ACTIVATION_TYPES)}"
        )
    p = config.percentile
    if not isinstance(p, (int, float)) or not math.isfinite(p) or not 50.0 < p <= 100.0:
        raise QuenchError(f"percentile must be in (50, 100], got {p!r}")
    if isinstance(config.exclude, str):
        raise QuenchError("exclude must be a sequence of node names, not a string")


def percentile_of(config: QuantConfig) -> float | None:
    """The percentile the ranges depend on: ``config.percentile`` for that method, else None."""
    return config.percentile if config.method == "percentile" else None


def weight_max(config: QuantConfig) -> int:
    """The largest int8 weight magnitude ``config`` allows.

    x86 int8 kernels without VNNI (AVX2, AVX-512 before Cascade Lake, SSE4.1) multiply u8
    activations by s8 weights and add adjacent pairs into int16 with saturation
    (``vpmaddubsw``): ``255 * (|w1| + |w2|)`` must stay <= 32767, which holds for |w| <= 64
    (ONNX Runtime's ``reduce_range``). VNNI, AMX and ARM accumulate in int32 and need no bound.
    """
    return 64 if config.weight_bits == 7 else 127
