"""The report document: every figure of a ``quench run`` job, typed; ``to_dict`` is
``report.json``, ``from_dict`` reads it back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from quench import __version__
from quench.hw import cpu_info
from quench.perf import PerfResult
from quench.pipeline import Prediction
from quench.records import BuildRecord, EvalRecord, ModelSource, Step


def engine_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("onnxruntime", "openvino"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict[str, Any]:
    """The CPU facts (:func:`quench.hw.cpu_info`), the engines' and Quench's versions."""
    return {**cpu_info(), "engines": engine_versions(), "quench": __version__}


@dataclass
class DataSources:
    """Where the job's calibration and evaluation images came from."""

    calibration: str | None = None  # --calib-images | ImageNet sample | synthetic
    calibration_images: str | None = None
    evaluation_images: str | None = None
    labels: str | None = None
    accuracy_note: str | None = None  # why accuracy was not measured and how to get it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobRecord:
    """What a job hands to its report (``quench.run`` fills it in): its steps in order, the
    notes it logged, each precision's build, and where the images came from (None: the job
    stopped before choosing them)."""

    options: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    builds: dict[str, BuildRecord] = field(default_factory=dict)
    precisions: list[str] = field(default_factory=list)
    data: DataSources | None = None


@dataclass
class DocBuild:
    """A build as the report shows it; ``same_as``: the earlier precision whose artifact is
    byte-identical (shown once)."""

    precision: str
    build: BuildRecord
    same_as: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"precision": self.precision, **self.build.to_dict()}
        return {**d, "same_as": self.same_as} if self.same_as else d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DocBuild:
        return cls(d["precision"], BuildRecord.from_dict(d), d.get("same_as"))


@dataclass
class Stability:
    """Whether the speed figures are trustworthy: every warning of every perf result."""

    unstable: bool
    warnings: list[str]
    max_other_cores: float | None


@dataclass
class Speedup:
    ratio: float
    beyond_noise: bool


@dataclass
class Versus:
    """One build against fp32: speedup per batch size and the top-1 change in points."""

    precision: str
    speedup: dict[str, Speedup]
    same_as: str | None = None
    top1_change_points: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["top1_change_points"] is None:
            del d["top1_change_points"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Versus:
        speedup = {b: Speedup(**s) for b, s in d["speedup"].items()}
        return cls(d["precision"], speedup, d.get("same_as"), d.get("top1_change_points"))


@dataclass
class BatchVerdict:
    fastest: str
    qps: float
    speedup: float | None
    tied_with: list[str]
    top1_change_points: float | None
    unstable: bool


@dataclass
class Verdict:
    """The fastest build within the accuracy bound, per batch size."""

    max_top1_drop_points: float
    accuracy_measured: bool
    rule: str
    batches: dict[str, BatchVerdict] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        batches = {b: BatchVerdict(**x) for b, x in d["batches"].items()}
        return cls(d["max_top1_drop_points"], d["accuracy_measured"], d["rule"], batches)


@dataclass
class ReportDoc:
    """Every figure of the job (``report.json``)."""

    quench_version: str
    created: str
    machine: dict[str, Any]  # machine(): the CPU facts as quench.hw reports them
    options: dict[str, Any]  # the job's RunOptions, as JSON
    model: ModelSource | None
    precisions: list[str]
    builds: list[DocBuild]
    accuracy: list[EvalRecord]
    perf: list[PerfResult]
    stability: Stability
    classify: dict[str, list[Prediction]]  # precision -> the sample images' top-k
    data: DataSources | None
    notes: list[str]
    steps: list[Step]  # without their results
    versus_fp32: list[Versus] = field(default_factory=list)
    verdict: Verdict | None = None
    total_seconds: float | None = None
    plots: dict[str, str] | None = None  # name -> file, relative to the report folder

    @property
    def failed(self) -> list[dict[str, str]]:
        return [{"step": s.id, "error": s.message} for s in self.steps if s.status == "failed"]

    @property
    def skipped(self) -> list[dict[str, str]]:
        return [{"step": s.id, "why": s.message} for s in self.steps if s.status == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "quench_version": self.quench_version,
            "created": self.created,
            "machine": self.machine,
            "options": self.options,
            "model": self.model.to_dict() if self.model else None,
            "precisions": list(self.precisions),
            "builds": [b.to_dict() for b in self.builds],
            "accuracy": [a.to_dict() for a in self.accuracy],
            "perf": [r.to_dict() for r in self.perf],
            "stability": asdict(self.stability),
            "classify": {p: [x.to_dict() for x in xs] for p, xs in self.classify.items()},
            "data": self.data.to_dict() if self.data else {},
            "notes": list(self.notes),
            "steps": [s.summary() for s in self.steps],
            "failed": self.failed,
            "skipped": self.skipped,
            "versus_fp32": [v.to_dict() for v in self.versus_fp32],
            "verdict": asdict(self.verdict) if self.verdict else None,
        }
        if self.total_seconds is not None:
            d["total_seconds"] = self.total_seconds
        if self.plots is not None:
            d["plots"] = dict(self.plots)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReportDoc:
        """A ``report.json`` read back (steps without their results)."""
        return cls(
            quench_version=d["quench_version"],
            created=d["created"],
            machine=d["machine"],
            options=d["options"],
            model=ModelSource.from_dict(d["model"]) if d.get("model") else None,
            precisions=list(d["precisions"]),
            builds=[DocBuild.from_dict(b) for b in d["builds"]],
            accuracy=[EvalRecord.from_dict(a) for a in d["accuracy"]],
            perf=[PerfResult.from_dict(r) for r in d["perf"]],
            stability=Stability(**d["stability"]),
            classify={p: [Prediction.from_dict(x) for x in xs] for p, xs in d["classify"].items()},
            data=DataSources(**d["data"]) if d.get("data") else None,
            notes=list(d["notes"]),
            steps=[Step(**s) for s in d["steps"]],
            versus_fp32=[Versus.from_dict(v) for v in d.get("versus_fp32", [])],
            verdict=Verdict.from_dict(d["verdict"]) if d.get("verdict") else None,
            total_seconds=d.get("total_seconds"),
            plots=d.get("plots"),
        )
