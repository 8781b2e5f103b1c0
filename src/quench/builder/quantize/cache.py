"""The calibration cache: one JSON envelope, written and read here only.

The envelope is ONNX Runtime's ``TensorsData`` JSON (the activation ranges, which
``quantize_static`` reads as its calibration cache) with one ``quench`` section holding the rest
of what the calibration pass measured (the input means of every Conv/Gemm, the pixel-grid first
layer's input moments), what it depends on (method, percentile, a fingerprint of the graph) and,
when the builder made it, where it came from (:class:`Source`: the cache key, the model, the
images, the settings). The same bytes are the cache file, the artifact's ``calibration.json`` and
:attr:`QuantResult.ranges`. A cache is only an optimisation: a file this version cannot use is
reported in one line and the build calibrates again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from quench.builder.quantize.config import QuantConfig, percentile_of
from quench.builder.quantize.statistics import Means, Ranges
from quench.errors import QuenchError

FORMAT = "quench-calibration"
# 2: one envelope (format 1 nested a "quench-ranges" document in a "quench-calibration" file)
VERSION = 2

Warn = Callable[[str], None]


@dataclass
class Calibration:
    """What the calibration pass measured: all the later stages need from the images."""

    ranges: Ranges
    means: Means
    moments: np.ndarray | None = None  # E[p p^T] of the pixel-grid Conv's input patches (GPTQ)


@dataclass(frozen=True)
class Source:
    """What a calibration was made from; ``key`` names its cache file."""

    key: str
    model_sha256: str
    images: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        model_sha256: str,
        calib_digest: str,
        images: Mapping[str, Any],
        config: QuantConfig,
    ) -> Source:
        """The source of a calibration of ``config`` on these preprocessed images."""
        settings = {"config": asdict(config), "precision_family": "int8"}
        return cls(cache_key(model_sha256, calib_digest, settings), model_sha256, images, settings)


def cache_key(model_sha256: str, calib_digest: str, settings: Mapping[str, Any]) -> str:
    """What a calibration cache depends on: the model, the preprocessed images, the method."""
    blob = json.dumps([model_sha256, calib_digest, settings], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def fingerprint(model: onnx.ModelProto) -> str:
    """The graph's structure (node names, types and wiring): which tensors the ranges are for."""
    h = hashlib.sha256()
    for n in model.graph.node:
        h.update(f"{n.op_type}|{n.name}|{','.join(n.input)}|{','.join(n.output)}\n".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# the envelope


def _array(v: float) -> dict[str, Any]:
    return {"CLS": "numpy.array", "data": float(np.float32(v)), "dtype": "float32"}


def dump(
    cal: Calibration,
    config: QuantConfig,
    model: onnx.ModelProto,
    source: Source | None = None,
) -> bytes:
    """The envelope of ``cal``, measured on ``model`` with ``config`` (deterministic bytes)."""
    quench: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "method": config.method,
        "percentile": percentile_of(config),
        "graph": fingerprint(model),
        "input_means": cal.means,
    }
    if cal.moments is not None:
        quench["first_layer_moments"] = {
            "size": int(cal.moments.shape[0]),
            "values": [float(v) for v in cal.moments.reshape(-1)],
        }
    if source is not None:
        quench["source"] = {
            "key": source.key,
            "model_sha256": source.model_sha256,
            "images": dict(source.images),
            "settings": dict(source.settings),
        }
    payload = {
        "CLS": "TensorsData",
        "calibration_method": {"CLS": "CalibrationMethod", "value": "CalibrationMethod.MinMax"},
        "data": {
            t: {"CLS": "TensorData", "highest": _array(r[1]), "lowest": _array(r[0])}
            for t, r in cal.ranges.items()
        },
        "smooth_quant": False,
        "quench": quench,
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def load(
    blob: bytes, config: QuantConfig, model: onnx.ModelProto, tensors: list[str]
) -> Calibration:
    """The calibration in ``blob``; :class:`QuenchError` unless it is readable and made with
    ``config``'s method for ``model``'s graph, with a range for each of ``tensors``."""
    try:
        d = json.loads(blob)
        q = d["quench"]
        if q.get("format") != FORMAT or q.get("version") != VERSION:
            raise ValueError("not a Quench calibration cache of this version")
        ranges = {
            t: (float(v["lowest"]["data"]), float(v["highest"]["data"]))
            for t, v in d["data"].items()
        }
        means = {
            t: {"mean": [float(x) for x in v["mean"]], "shape": [int(x) for x in v["shape"]]}
            for t, v in (q.get("input_means") or {}).items()
        }
        moments = None
        if q.get("first_layer_moments") is not None:
            fm = q["first_layer_moments"]
            size = int(fm["size"])
            moments = np.asarray([float(v) for v in fm["values"]], np.float64).reshape(size, size)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QuenchError(f"unreadable calibration cache ({exc})") from None
    want = percentile_of(config)
    if q.get("method") != config.method or q.get("percentile") != want:
        made = q.get("method") if q.get("percentile") is None else (q["method"], q["percentile"])
        asked = config.method if want is None else (config.method, want)
        raise QuenchError(f"calibration cache was made with method {made!r}, not {asked!r}")
    if q.get("graph") != fingerprint(model):
        raise QuenchError("calibration cache was made for a different model graph")
    missing = [t for t in tensors if t not in ranges]
    if missing:
        raise QuenchError(
            f"calibration cache does not match the model: no range for {missing[0]!r}"
        )
    return Calibration(ranges, means, moments)


# --------------------------------------------------------------------------------------------
# the cache file


def read(path: Path, key: str, warn: Warn) -> bytes | None:
    """The envelope in ``path`` if it holds a calibration for exactly ``key``, else None (with a
    one-line reason through ``warn`` when the file exists but cannot be used)."""
    if not path.is_file():
        return None
    try:
        blob = path.read_bytes()
        data = json.loads(blob)
    except (OSError, ValueError) as exc:
        warn(f"warning: ignoring unreadable calibration cache {path} ({exc})")
        return None
    if isinstance(data, dict) and data.get("format") == FORMAT:  # format 1: one level up
        warn(
            f"warning: {path} is a calibration cache of an older Quench "
            f"(format {data.get('version')!r}); recalibrating"
        )
        return None
    q = data.get("quench") if isinstance(data, dict) else None
    if not isinstance(q, dict) or q.get("format") != FORMAT:
        warn(f"warning: {path} is not a Quench calibration cache; recalibrating")
        return None
    if q.get("version") != VERSION:
        warn(
            f"warning: {path} is a calibration cache of format {q.get('version')!r}, "
            f"this Quench reads {VERSION}; recalibrating"
        )
        return None
    source = q.get("source")
    if not isinstance(source, dict) or source.get("key") != key:
        warn(f"calibration cache {path} is for other inputs; recalibrating")
        return None
    return blob


def write(path: Path, blob: bytes, warn: Warn) -> None:
    """Store ``blob`` as the cache file ``path`` (a failure is a warning: the cache is only an
    optimisation)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    except OSError as exc:
        warn(f"warning: cannot write calibration cache {path} ({exc})")
