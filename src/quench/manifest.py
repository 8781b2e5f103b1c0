"""The artifact manifest: typed sections, written by :meth:`Manifest.to_dict`, read and
validated by :meth:`Manifest.from_dict` (a one-line :class:`ArtifactError` naming the field).

On disk it is JSON (``manifest.json``, format ``quench-artifact`` version 1). Sections Quench
reads are typed; the build's records (verification, fidelity, quantization, ...) are kept as
the JSON objects they are, and unknown top-level keys are carried through unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from typing import Any

from quench.errors import ArtifactError, QuenchError
from quench.precision import FLOAT_TYPES, Precision
from quench.presets import INPUTS, INTERPOLATIONS, DataConfig

FORMAT = "quench-artifact"
FORMAT_VERSION = 1
OUTPUT_KINDS = ("logits", "probabilities")
_VOLATILE = {"volatile": True}  # field metadata: left out of the content digest


class _Invalid(ArtifactError):
    """One field is wrong (``Manifest.from_dict`` adds the artifact's path)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"manifest field {field!r}: {problem}")
        self.field, self.problem = field, problem


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise _Invalid(where, "missing")
    return d[key]


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(where, f"expected an object, got {_show(value)}")
    return value


def _opt_obj(d: dict[str, Any], key: str) -> dict[str, Any] | None:
    return None if d.get(key) is None else _obj(d[key], key)


def _str(value: Any, where: str, choices: Collection[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(where, f"expected a non-empty string, got {_show(value)}")
    if choices is not None and value not in choices:
        raise _Invalid(where, f"expected one of {', '.join(choices)}, got {_show(value)}")
    return value


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _Invalid(where, f"expected an integer >= {minimum}, got {_show(value)}")
    return value


def _numbers(value: Any, where: str, positive: bool = False) -> tuple[float, float, float]:
    ok = (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )
    if not ok or (positive and any(v <= 0 for v in value)):
        kind = "3 positive numbers" if positive else "3 numbers"
        raise _Invalid(where, f"expected {kind}, got {_show(value)}")
    return (float(value[0]), float(value[1]), float(value[2]))


@dataclass(frozen=True)
class Tensor:
    """A model input or output: name, element type, shape (``"N"``: dynamic batch)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Tensor:
        d = _obj(d, where)
        shape = _need(d, "shape", f"{where}.shape")
        if (
            not isinstance(shape, list)
            or not shape
            or not all(
                isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool) and s > 0)
                for s in shape
            )
        ):
            raise _Invalid(f"{where}.shape", f"expected a list of dimensions, got {_show(shape)}")
        return cls(
            _str(_need(d, "name", f"{where}.name"), f"{where}.name"),
            _str(d.get("dtype", "float32"), f"{where}.dtype"),
            tuple(shape),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class IO:
    input: Tensor
    output: Tensor

    @classmethod
    def from_dict(cls, d: Any) -> IO:
        d = _obj(d, "io")
        return cls(
            Tensor.from_dict(_need(d, "input", "io.input"), "io.input"),
            Tensor.from_dict(_need(d, "output", "io.output"), "io.output"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input.to_dict(), "output": self.output.to_dict()}


@dataclass(frozen=True)
class Batch:
    """``fixed`` with a size, or ``dynamic`` (size None)."""

    policy: str
    size: int | None

    @classmethod
    def of(cls, size: int | None) -> Batch:
        return cls("fixed" if size else "dynamic", size or None)

    @classmethod
    def from_dict(cls, d: Any) -> Batch:
        d = _obj(d, "batch")
        policy = _str(_need(d, "policy", "batch.policy"), "batch.policy", ("fixed", "dynamic"))
        size = d.get("size")
        if policy == "fixed":
            size = _int(size, "batch.size", 1)
        elif size is not None:
            raise _Invalid("batch.size", f"expected null for a dynamic batch, got {_show(size)}")
        return cls(policy, size)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "size": self.size}


@dataclass(frozen=True)
class PrecisionInfo:
    """The mode and what the engine reported about it (``stored``, ``computes``, ...)."""

    mode: Precision
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def compute(self) -> str:
        """The arithmetic that dominates: ``int8``, else the float type that really runs
        (OpenVINO records it as ``inference_precision``; without it, the type ``computes``
        names first, as ONNX Runtime's ``float32``), else the mode's float type."""
        if self.mode.is_int8:
            return "int8"
        ran = self.info.get("inference_precision")
        if ran in FLOAT_TYPES:
            return str(ran)
        text = str(self.info.get("computes", "")).lower()
        return next(
            (t for t in ("bfloat16", "float16", "float32") if text.startswith(t)), "float32"
        )

    @classmethod
    def from_dict(cls, d: Any) -> PrecisionInfo:
        d = _obj(d, "precision")
        name = _need(d, "mode", "precision.mode")
        try:
            mode = Precision.parse(name)
        except QuenchError as exc:
            raise _Invalid("precision.mode", str(exc)) from None
        return cls(mode, {k: v for k, v in d.items() if k != "mode"})

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.name, **self.info}


@dataclass(frozen=True)
class EngineInfo:
    name: str
    version: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, engines: Collection[str] | None) -> EngineInfo:
        d = _obj(d, "engine")
        name = _str(_need(d, "name", "engine.name"), "engine.name", engines)
        options = _obj(d.get("options", {}), "engine.options")
        return cls(name, str(d.get("version", "")), dict(options))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "options": self.options}


def _selfcheck(d: dict[str, Any]) -> dict[str, Any] | None:
    """The self-check section: the objects and numbers :mod:`quench.selfcheck` reads."""
    section = _opt_obj(d, "selfcheck")
    if section is None:
        return None
    _obj(section.get("build_host", {}), "selfcheck.build_host")
    for key in ("bound", "build_figures"):
        values = _obj(section.get(key, {}), f"selfcheck.{key}")
        for name in ("top1_agreement", "sqnr_db"):
            v = values.get(name, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _Invalid(f"selfcheck.{key}.{name}", f"expected a number, got {_show(v)}")
    return section


def _preprocess(d: Any) -> DataConfig:
    d = _obj(d, "preprocess")
    unknown = sorted(set(d) - {f.name for f in fields(DataConfig)})
    if unknown:
        raise _Invalid(f"preprocess.{unknown[0]}", "unknown setting")
    given: dict[str, Any] = {
        "mean": _numbers(_need(d, "mean", "preprocess.mean"), "preprocess.mean"),
        "std": _numbers(_need(d, "std", "preprocess.std"), "preprocess.std", positive=True),
    }
    for key in ("resize", "crop"):
        if key in d:
            given[key] = _int(d[key], f"preprocess.{key}", 1)
    choices = {
        "interpolation": INTERPOLATIONS,
        "channel_order": ("RGB", "BGR"),
        "layout": ("NCHW", "NHWC"),
        "input": INPUTS,  # absent in float32 artifacts (and in every older one)
    }
    for key, allowed in choices.items():
        if key in d:
            given[key] = _str(d[key], f"preprocess.{key}", allowed)
    try:
        return DataConfig(**given)
    except QuenchError as exc:
        raise _Invalid("preprocess", str(exc)) from None


@dataclass
class Manifest:
    """Everything an artifact records. Fields marked volatile vary between equal builds (date,
    timings, host, measured figures) and are left out of the content digest."""

    name: str
    labels: list[str]
    preprocess: DataConfig
    io: IO
    batch: Batch
    precision: PrecisionInfo
    engine: EngineInfo
    source: dict[str, Any]
    quench_version: str
    created: str | None = field(default=None, metadata=_VOLATILE)
    output_kind: str = "logits"
    preset: dict[str, Any] | None = None
    model: dict[str, Any] | None = None  # macs_per_image, parameters
    build: dict[str, Any] | None = None  # the options as given
    host: dict[str, Any] | None = field(default=None, metadata=_VOLATILE)
    verification: dict[str, Any] | None = field(default=None, metadata=_VOLATILE)
    engine_selection: dict[str, Any] | None = field(default=None, metadata=_VOLATILE)
    # its settings are in payload/calibration.json; the rest is timing
    quantization: dict[str, Any] | None = field(default=None, metadata=_VOLATILE)
    # bf16 / fp16 compute: the layers kept in fp32 and the repair that chose them
    reduced_precision: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    selfcheck: dict[str, Any] | None = None
    accuracy: dict[str, Any] | None = None
    timings: dict[str, Any] | None = field(default=None, metadata=_VOLATILE)
    build_seconds: float | None = field(default=None, metadata=_VOLATILE)
    # written by artifact.save
    format: str | None = None
    format_version: int | None = None
    payloads: dict[str, str] | None = None
    content_digest: str | None = field(default=None, metadata=_VOLATILE)
    extra: dict[str, Any] = field(default_factory=dict)  # keys this Quench does not know

    @property
    def macs_per_image(self) -> int | None:
        return (self.model or {}).get("macs_per_image")

    def with_engine(self, engine: EngineInfo, batch: int | None) -> Manifest:
        """A copy for another compiled form of the same model (engine, batch)."""
        b = Batch.of(batch)
        io = IO(
            replace(self.io.input, shape=(batch or "N", *self.io.input.shape[1:])),
            replace(self.io.output, shape=(batch or "N", *self.io.output.shape[1:])),
        )
        return replace(self, engine=engine, batch=b, io=io)

    def with_float_input(self) -> Manifest:
        """A copy whose engine takes normalised float32 tensors, as the source model does (the
        build's fp32 reference for a ``--input uint8`` artifact)."""
        data = self.preprocess.as_float()
        shape = (self.io.input.shape[0], *data.input_shape)
        io = IO(Tensor(self.io.input.name, "float32", shape), self.io.output)
        return replace(self, preprocess=data, io=io)

    @classmethod
    def from_dict(
        cls, d: Any, engines: Collection[str] | None = None, where: str | None = None
    ) -> Manifest:
        """Read and validate ``d`` (manifest.json as parsed); ``engines``: the engine names
        this Quench knows; ``where`` (the artifact's path) leads the error message."""
        try:
            return cls._read(_obj(d, "manifest"), engines)
        except _Invalid as bad:
            raise ArtifactError(f"{where}: {bad}" if where else str(bad)) from None

    @classmethod
    def _read(cls, d: dict[str, Any], engines: Collection[str] | None) -> Manifest:
        labels = _need(d, "labels", "labels")
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(x, str) for x in labels)
        ):
            raise _Invalid("labels", f"expected a list of strings, got {_show(labels)}")
        data = _preprocess(_need(d, "preprocess", "preprocess"))
        io = IO.from_dict(_need(d, "io", "io"))
        batch = Batch.from_dict(_need(d, "batch", "batch"))
        want: list[int | str] = [batch.size or "N", *data.input_shape]
        got = list(io.input.shape)
        dim0_ok = got[0] == batch.size if batch.size else isinstance(got[0], str)
        if not dim0_ok or got[1:] != want[1:]:
            raise _Invalid(
                "io.input.shape",
                f"expected {_show(want)} (batch, then the preprocess crop and layout), "
                f"got {_show(got)}",
            )
        if io.input.dtype != data.input_dtype:
            raise _Invalid(
                "io.input.dtype",
                f"expected {data.input_dtype} (preprocess.input: "
                f"{'uint8 pixels' if data.pixels else 'float32, the default'}), "
                f"got {_show(io.input.dtype)}",
            )
        if len(io.output.shape) != 2:
            raise _Invalid(
                "io.output.shape", f"expected [batch, classes], got {_show(list(io.output.shape))}"
            )
        classes = io.output.shape[-1]
        if isinstance(classes, int) and len(labels) != classes:
            raise _Invalid(
                "labels", f"expected {classes} labels (the output's classes), got {len(labels)}"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        version = d.get("format_version")
        return cls(
            name=_str(_need(d, "name", "name"), "name"),
            labels=list(labels),
            preprocess=data,
            io=io,
            batch=batch,
            precision=PrecisionInfo.from_dict(_need(d, "precision", "precision")),
            engine=EngineInfo.from_dict(_need(d, "engine", "engine"), engines),
            source=_obj(_need(d, "source", "source"), "source"),
            quench_version=_str(_need(d, "quench_version", "quench_version"), "quench_version"),
            created=d.get("created"),
            output_kind=_str(d.get("output_kind", "logits"), "output_kind", OUTPUT_KINDS),
            preset=_opt_obj(d, "preset"),
            model=_opt_obj(d, "model"),
            build=_opt_obj(d, "build"),
            host=_opt_obj(d, "host"),
            verification=_opt_obj(d, "verification"),
            engine_selection=_opt_obj(d, "engine_selection"),
            quantization=_opt_obj(d, "quantization"),
            reduced_precision=_opt_obj(d, "reduced_precision"),
            fidelity=_opt_obj(d, "fidelity"),
            selfcheck=_selfcheck(d),
            accuracy=_opt_obj(d, "accuracy"),
            timings=_opt_obj(d, "timings"),
            build_seconds=d.get("build_seconds"),
            format=d.get("format"),
            format_version=version if isinstance(version, int) else None,
            payloads=_opt_obj(d, "payloads"),
            content_digest=d.get("content_digest"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (optional sections that are None are left out)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, list):
                value = list(value)
            out[f.name] = value
        return {**out, **self.extra}


# Top-level keys left out of the content digest: equal for equal builds, whenever made.
VOLATILE: frozenset[str] = frozenset(f.name for f in fields(Manifest) if f.metadata.get("volatile"))
