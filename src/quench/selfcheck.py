"""Fidelity against fp32, and the self-check an artifact carries to prove itself where it runs.

A build measures how close its model is to the fp32 source (``fidelity``) on real images the
calibration did not use. A few of those inputs travel in the artifact with their fp32 outputs
(``payload/selfcheck/``) and the figures the build host measured on them. Loading the artifact
on a host whose CPU features, ``$ONEDNN_MAX_CPU_ISA`` or engine version differ from the build
host's runs them again (under a second) and refuses the artifact when its fidelity falls below
the bound the build recorded: an INT8 artifact made for VNNI/AMX CPUs that loses accuracy on an
AVX2-class CPU is caught before it classifies anything.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from quench.backend import get_engine
from quench.errors import QuenchError
from quench.hw import host_fingerprint

INPUTS = "selfcheck/inputs.npy"
REFERENCE = "selfcheck/reference.npy"
IMAGES = 8  # inputs the artifact carries
SQNR_MARGIN_DB = 3.0  # a host may measure this much less than the build host (2x error power)
DEFAULT_MIN_TOP1_AGREEMENT = 0.8
SQNR_CAP_DB = (
    300.0  # JSON has no infinity  # a build below this top-1 agreement with fp32 is refused
)


class SelfCheckError(QuenchError):
    """An artifact's fidelity on this host is below the bound its build recorded."""


class FidelityError(QuenchError):
    """A build's fidelity against fp32 on held-out images is below the bound."""


def fidelity(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """How close outputs ``got`` are to the fp32 ``ref`` (both ``[N, classes]``).

    ``top1_agreement``: share of rows with the same arg-max; ``sqnr_db``: signal to
    quantization-noise ratio of the outputs, ``10 log10(sum ref^2 / sum (got - ref)^2)``,
    within +-``SQNR_CAP_DB`` (+300: bit-equal; -300: non-finite outputs, ``max_abs_diff`` -1).
    """
    if got.shape != ref.shape:
        raise QuenchError(f"output shape {got.shape} != reference {ref.shape}")
    g, r = got.astype(np.float64), ref.astype(np.float64)
    finite = bool(np.all(np.isfinite(g)))
    noise = float(np.sum((g - r) ** 2)) if finite else math.inf
    signal = max(float(np.sum(r**2)), 1e-300)
    sqnr = (
        SQNR_CAP_DB if noise == 0 else 10 * math.log10(signal / noise) if finite else -SQNR_CAP_DB
    )
    return {
        "top1_agreement": float(np.mean(g.argmax(1) == r.argmax(1))) if len(g) else 1.0,
        "sqnr_db": round(min(max(sqnr, -SQNR_CAP_DB), SQNR_CAP_DB), 3),
        "max_abs_diff": float(np.max(np.abs(g - r))) if finite and len(g) else -1.0,
    }


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a))
    return buf.getvalue()


def _read_npy(data: bytes, name: str) -> np.ndarray:
    """A numeric array from ``.npy`` bytes (NumPy refuses object arrays by default)."""
    try:
        a = np.load(io.BytesIO(data))
    except (ValueError, OSError, EOFError) as exc:
        raise QuenchError(f"artifact self-check payload {name} is unreadable ({exc})") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu" or a.ndim < 2:
        raise QuenchError(f"artifact self-check payload {name} is not a numeric batch")
    return a


def host_key(engine: str, engine_version: str) -> dict[str, Any]:
    """What decides an artifact's numerics: CPU architecture, ISA flags, ISA cap, engine, and
    the engine's device where it has one (a GPU engine's GPU, CUDA, cuDNN)."""
    key = {**host_fingerprint(), "engine": engine, "engine_version": engine_version}
    try:
        device = get_engine(engine).host()
    except QuenchError:  # an engine not installed here: the engine line tells
        device = {}
    return {**key, "device": device} if device else key


def record(
    inputs: np.ndarray,
    reference: np.ndarray,
    got: np.ndarray,
    source: str,
    engine: str,
    engine_version: str,
    min_top1_agreement: float,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest section and payloads of a self-check on ``inputs`` (already stored form:
    float16-exact tensors, or uint8 pixels for a ``--input uint8`` artifact, kept as they are)."""
    figures = fidelity(got, reference)
    bound = {
        "top1_agreement": min_top1_agreement,
        # bit-equal to fp32 on the build host (the cap): demand fp32-level closeness elsewhere
        "sqnr_db": min(round(figures["sqnr_db"] - SQNR_MARGIN_DB, 3), 60.0),
    }
    section = {
        "images": len(inputs),
        "source": source,
        "build_host": host_key(engine, engine_version),
        "build_figures": figures,
        "bound": bound,
    }
    stored = inputs if inputs.dtype == np.uint8 else inputs.astype(np.float16)
    payloads = {INPUTS: _npy(stored), REFERENCE: _npy(reference)}
    return section, payloads


@dataclass
class Result:
    """What a self-check found; ``ran`` is False when the host matched and nothing ran."""

    ran: bool
    passed: bool
    differences: list[str] = field(default_factory=list)
    figures: dict[str, float] | None = None
    bound: dict[str, Any] | None = None
    seconds: float = 0.0
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One phrase per way this host differs from the build host (empty: the same)."""
    out = []
    if recorded.get("machine") != now.get("machine"):
        out.append(f"architecture {recorded.get('machine')} (build) vs {now.get('machine')} (here)")
    a, b = set(recorded.get("flags") or []), set(now.get("flags") or [])
    if a != b:
        lost, gained = sorted(a - b), sorted(b - a)
        parts = ([f"without {','.join(lost)}"] if lost else []) + (
            [f"with {','.join(gained)}"] if gained else []
        )
        out.append("CPU " + " and ".join(parts) + " here")
    if recorded.get("onednn_max_cpu_isa") != now.get("onednn_max_cpu_isa"):
        out.append(
            f"ONEDNN_MAX_CPU_ISA {recorded.get('onednn_max_cpu_isa') or 'unset'} (build) vs "
            f"{now.get('onednn_max_cpu_isa') or 'unset'} (here)"
        )
    if recorded.get("device", {}) != now.get("device", {}):
        out.append(f"device {recorded.get('device', {})} (build) vs {now.get('device', {})} (here)")
    if (recorded.get("engine"), recorded.get("engine_version")) != (
        now.get("engine"),
        now.get("engine_version"),
    ):
        out.append(
            f"{recorded.get('engine')} {recorded.get('engine_version')} (build) vs "
            f"{now.get('engine')} {now.get('engine_version')} (here)"
        )
    return out


def check(model: Any, always: bool = False) -> Result:
    """Run ``model``'s self-check when this host differs from the build host (or ``always``).

    ``model`` is a :class:`quench.model.Model`. Returns the result; never raises on a failed
    check (see :func:`enforce`).
    """
    import time

    section = model.manifest.get("selfcheck")
    if not isinstance(section, dict):
        return Result(False, True, message="the artifact carries no self-check (older build)")
    now = host_key(model.engine, get_engine(model.engine).version())
    diffs = differences(section.get("build_host", {}), now)
    if not diffs and not always:
        return Result(False, True, message="same host class as the build: not needed")
    payloads = model.artifact.payloads
    if INPUTS not in payloads or REFERENCE not in payloads:
        raise QuenchError("artifact self-check payloads are missing")
    x = _read_npy(payloads[INPUTS], INPUTS)
    if model.data.pixels != (x.dtype == np.uint8):
        raise QuenchError(
            f"artifact self-check payload {INPUTS} holds {x.dtype} inputs, but the model "
            f"takes {model.data.input_dtype}"
        )
    x = x if model.data.pixels else x.astype(np.float32)
    ref = _read_npy(payloads[REFERENCE], REFERENCE)
    if ref.shape != (len(x), len(model.labels)):
        raise QuenchError(
            f"artifact self-check payload {REFERENCE} has shape {ref.shape}, expected "
            f"({len(x)}, {len(model.labels)}): one output row per input image"
        )
    t = time.perf_counter()
    figures = fidelity(model.predict(x), ref)
    seconds = round(time.perf_counter() - t, 3)
    bound = section.get("bound", {})
    passed = figures["top1_agreement"] >= float(bound.get("top1_agreement", 0.0)) and figures[
        "sqnr_db"
    ] >= float(bound.get("sqnr_db", -math.inf))
    built = section.get("build_figures", {})
    where = "; ".join(diffs) if diffs else "same host class as the build"
    message = (
        f"self-check on {len(x)} images: top-1 agreement with fp32 "
        f"{figures['top1_agreement']:.0%} (build host {built.get('top1_agreement', 0):.0%}, "
        f"bound {float(bound.get('top1_agreement', 0)):.0%}), output SQNR "
        f"{figures['sqnr_db']:.1f} dB (build host {float(built.get('sqnr_db', 0)):.1f} dB, "
        f"bound {float(bound.get('sqnr_db', 0)):.1f} dB); {where}"
    )
    return Result(True, passed, diffs, figures, bound, seconds, message)


def enforce(model: Any, result: Result, name: str) -> None:
    """Raise :class:`SelfCheckError` (one line) for a failed ``result``."""
    if result.passed:
        return
    hint = ""
    q = model.manifest.get("quantization", {})
    if q.get("target") == "native":
        hint = "; rebuild with --target portable for an artifact exact on every CPU"
    raise SelfCheckError(
        f"{name}: fails its self-check on this host ({result.message}){hint}; "
        "--accept-host-mismatch runs it anyway"
    )
