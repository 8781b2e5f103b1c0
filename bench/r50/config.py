"""What bench/run.py measures (the configurations, in table order), its result records and
its timestamped log line."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO

from quench import precision

FP32 = precision.FORCE_FLOAT32
INT8 = precision.QINT8_MIXED_FLOAT32
INT8_F16 = precision.QINT8_MIXED_FLOAT16
BIN = Path(sys.executable).parent
QUENCH = BIN / "quench"
BENCHMARK_APP = BIN / "benchmark_app"
MODEL_NAME = "resnet50-v1-7"
CHW = (3, 224, 224)
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "imagenet-sample" / "calib.txt"
DEFAULT_VAL = DEFAULT_CALIB.with_name("val.txt")

FAMILIES = ("fp32", "bf16", "int8")
FAMILY_ALIASES = {"fp32": "fp32", "f32": "fp32", "bf16": "bf16", "fp16": "bf16", "int8": "int8"}
FAMILY_TITLE = {
    "fp32": "FP32",
    "bf16": "Reduced precision (bf16 / fp16)",
    "int8": "INT8",
}
FAMILY_COMPUTE = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}


@dataclass(frozen=True)
class QuenchBuild:
    """One ``quench build`` of the replica: a precision mode, and extra flags for a variant
    measured as a row of its own."""

    mode: str
    family: str
    variant: str = ""  # the row label's suffix for a build with extra flags
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """For file names."""
        return f"{self.mode}-{self.variant}" if self.variant else self.mode

    @property
    def label(self) -> str:
        return f"{self.mode} --{self.variant}" if self.variant else self.mode


@dataclass(frozen=True)
class BenchmarkApp:
    """One ``benchmark_app`` configuration on the source model."""

    family: str  # "default": the family of OpenVINO's own default precision on this CPU
    settings: str
    flags: tuple[str, ...]
    compute: str  # "?": OpenVINO's default, read from benchmark_app's output


# -- the configurations measured, in table order ---------------------------------------------

QUENCH_BUILDS = (
    QuenchBuild(FP32.name, "fp32"),
    QuenchBuild(precision.FORCE_BFLOAT16.name, "bf16"),
    QuenchBuild(precision.FORCE_FLOAT16.name, "bf16"),
    QuenchBuild(INT8.name, "int8"),
    QuenchBuild(INT8.name, "int8", "float-first-layer", ("--float-first-layer",)),
    QuenchBuild(INT8_F16.name, "int8"),
)
OV_SOURCE_CONFIGS = (
    BenchmarkApp(
        "fp32", "f32, latency hint", ("-hint", "latency", "-infer_precision", "f32"), "float32"
    ),
    BenchmarkApp("default", "default hint and precision", (), "?"),
    BenchmarkApp(
        "bf16", "bf16, latency hint", ("-hint", "latency", "-infer_precision", "bf16"), "bfloat16"
    ),
)
NNCF_IR = "nncf-int8.xml"  # in the work dir
NNCF_HINTS = (("default hint", ()), ("latency hint", ("-hint", "latency")))
# Also timed with two requests in flight, as benchmark_app's default throughput hint runs
REQUESTS_MODES = (FP32.name, precision.FORCE_BFLOAT16.name, INT8.name)
SERVE_MODES = (FP32.name, INT8.name)
PIPELINE_MODES = (FP32.name, precision.FORCE_BFLOAT16.name, INT8.name)
MEMORY_MODE = INT8.name  # the fastest engine: the most images in flight per second
ISA_CLASS = {"AVX2": "AVX2-only", "AVX512_CORE": "AVX-512 without VNNI"}
OV_PRECISION_FAMILY = {"f32": "fp32", "bf16": "bf16", "f16": "bf16"}


T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.0f}s] {msg}", file=sys.stderr, flush=True)


@dataclass
class Row:
    family: str
    kind: str  # "peer" | "quench"
    label: str
    settings: str
    compute: str  # for the share of peak: float32 | bfloat16 | float16 | int8
    qps: dict[int, float] = field(default_factory=dict)
    rounds: dict[int, list[float]] = field(default_factory=dict)  # qps of each round
    p50: dict[int, float] = field(default_factory=dict)
    p99: dict[int, float] = field(default_factory=dict)
    peak: dict[int, float] = field(default_factory=dict)  # share of peak, 0..1
    device: str = "cpu"
    commands: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mode: str = ""  # quench precision mode
    model: str = MODEL_NAME


@dataclass
class Prep:
    """A model-preparation step (peer quantization or quench build)."""

    label: str
    family: str
    seconds: float | None
    command: str
    error: str | None = None
    detail: str = ""


@dataclass
class Clock:
    """The reported clock, and the measured one (exported to every quench command)."""

    reported_ghz: float | None
    reported_how: str
    ghz: float | None
    how: str


@dataclass
class Built:
    """A Quench build of the replica: its row (timed later) and artifact (None: it failed)."""

    build: QuenchBuild
    row: Row
    artifact: Path | None
