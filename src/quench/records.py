"""The typed results of ``quench run``'s steps: what the job (:mod:`quench.run`) stores in its
``state.json`` and hands to its report (:mod:`quench.report`). Each record's ``to_dict`` is the
JSON the job has always written; ``from_dict`` reads it back (a stored result it cannot read
is measured again)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from quench.perf import PerfResult
from quench.pipeline import Prediction

R = TypeVar("R")


def _known(cls: type[R], d: dict[str, Any]) -> R:
    """``cls`` from the keys of ``d`` it has fields for (a missing required one: TypeError)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ModelSource:
    """The ``model`` step: the source model and where it came from."""

    path: str
    sha256: str
    signature: list[Any]  # [resolved path, size, mtime_ns]: unchanged files are not re-hashed
    source: str  # --model | cache | downloaded from URL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSource:
        return _known(cls, d)


@dataclass
class SampleRecord:
    """The ``sample`` step: the ImageNet sample fetched into the cache."""

    path: str
    images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleRecord:
        return _known(cls, d)


@dataclass
class BuildRecord:
    """A ``build`` step: the artifact and what its manifest says about it."""

    artifact: str
    sha256: str
    size_bytes: int
    content_digest: str
    name: str
    engine: str
    engine_version: str | None
    computes: str | None
    fidelity: dict[str, Any] | None  # the manifest's fidelity section, as it writes it
    build_seconds: float
    timings: dict[str, Any] = field(default_factory=dict)
    calibration: str | None = None  # INT8: --calib-images | ImageNet sample | synthetic

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["calibration"] is None:  # only INT8 builds say what they calibrated on
            del d["calibration"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildRecord:
        return _known(cls, d)


@dataclass
class ClassifyRecord:
    """A ``classify`` step: the sample images' top-k."""

    predictions: list[Prediction]

    def to_dict(self) -> dict[str, Any]:
        return {"predictions": [p.to_dict() for p in self.predictions]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifyRecord:
        return cls([Prediction.from_dict(p) for p in d["predictions"]])


@dataclass
class EvalRecord:
    """An ``eval`` step: top-1/top-5 on the labelled images."""

    model: str
    precision: str
    engine: str
    top1: float
    top5: float
    images: int
    correct_top1: int = 0
    correct_top5: int = 0
    failed: int = 0
    unlabeled: int = 0
    batch: int = 1
    failed_images: list[str] = field(default_factory=list)  # the first 20

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalRecord:
        return _known(cls, d)


@dataclass
class PerfRecord:
    """A ``perf`` step: one result per batch size."""

    results: list[PerfResult]

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerfRecord:
        return cls([PerfResult.from_dict(r) for r in d["results"]])


StepResult = ModelSource | SampleRecord | BuildRecord | ClassifyRecord | EvalRecord | PerfRecord


@dataclass
class Step:
    """One step of the job and how it went."""

    id: str
    kind: str  # model | sample | build | classify | eval | perf | report
    precision: str | None = None
    status: str = "pending"  # ok | reused | failed | skipped
    seconds: float = 0.0
    message: str = ""
    result: StepResult | None = None

    @property
    def done(self) -> bool:
        """Whether it has a result (ran or was reused)."""
        return self.status in ("ok", "reused")

    def summary(self) -> dict[str, Any]:
        """The step without its result (the report's steps table)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "precision": self.precision,
            "status": self.status,
            "seconds": self.seconds,
            "message": self.message,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "result": self.result.to_dict() if self.result else {}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Step:
        """The inverse of ``to_dict``: the result read as its kind's record."""
        result = d.get("result")
        record = RECORDS.get(d["kind"])
        return cls(
            d["id"],
            d["kind"],
            d.get("precision"),
            d.get("status", "pending"),
            d.get("seconds", 0.0),
            d.get("message", ""),
            record.from_dict(result) if record and result else None,
        )


# each step kind's result record (report: none)
RECORDS: dict[str, Any] = {
    "model": ModelSource,
    "sample": SampleRecord,
    "build": BuildRecord,
    "classify": ClassifyRecord,
    "eval": EvalRecord,
    "perf": PerfRecord,
}
