"""``quench run``: the one-click job (fetch, build every precision, classify, eval, perf, report).

Like MagicMind's ``run.sh`` + ``perf.sh`` + ``eval.sh``. Where the images come from, first that
applies:

- INT8 calibration: ``--calib-images`` > ``calib.txt`` of a ``--sample-dir`` > ``calib.txt`` of the
  ImageNet sample in the cache (``quench fetch imagenet-sample``; fetched by ``quench run``
  itself when it fetches the model) > deterministic synthetic images
  (:mod:`quench.zoo.synth_images`: INT8 speed only, labelled so in the report);
- accuracy: ``--images``/``--labels`` > ``val.txt``/``ground_truth.tsv`` of a ``--sample-dir`` > of
  the cached sample > none (the report says why and how to get it).

Every step is keyed by the sha256 of its
inputs (source model, precision, options, Quench version, and for later steps the artifact's
``content_digest``); ``<out>/state.json`` keeps each key with its result, so a step whose inputs
did not change is reused. A failed step is reported and the job goes on with what it can.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from quench import __version__, report
from quench.batch_form import IF_POSSIBLE
from quench.builder.calibration import HOLDOUT_EVERY
from quench.builder.core import BuildOptions, candidate_engines
from quench.builder.core import build as do_build
from quench.errors import FetchError, QuenchError
from quench.evaluate import evaluate, list_images, read_ground_truth
from quench.hw import cpu_info
from quench.model import Model
from quench.perf import perf_model
from quench.pipeline import Prediction
from quench.precision import NAMES, Precision, is_int8
from quench.progress import Bar
from quench.records import (
    RECORDS,
    BuildRecord,
    ClassifyRecord,
    EvalRecord,
    ModelSource,
    PerfRecord,
    SampleRecord,
    Step,
    StepResult,
)
from quench.report import DataSources, ReportDoc
from quench.selfcheck import DEFAULT_MIN_TOP1_AGREEMENT
from quench.stats import load_changed, other_work_now
from quench.zoo.fetch import fetch_model, sha256_file
from quench.zoo.sample import fetch_sample
from quench.zoo.sample import find_sample as cached_sample
from quench.zoo.sample import sample_dir as cached_sample_dir
from quench.zoo.synth_images import synthetic_images

DEFAULT_PRESET = "resnet50-v1-7"
STATE_VERSION = 1
SAMPLE_COUNT = 4  # images classified in the "classify" step
TOPK = 5  # classes per image in the "classify" step

Log = Callable[[str], None]
OnClassified = Callable[[str, list[Prediction]], None]  # precision, the sample's predictions


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class RunOptions:
    """Everything ``quench run`` takes."""

    model: str | Path | None = None  # None: fetch the preset's official model
    preset: str | None = None  # None: detected from the model (fetch: resnet50-v1-7)
    images: str | Path | None = None  # folder or list file; None: the ImageNet sample's val.txt
    labels: str | Path | None = None  # ground truth; None: the sample's ground_truth.tsv
    calib_images: str | Path | None = None  # None: the sample's calib.txt, else synthetic images
    out: str | Path = "report"
    precisions: list[str] | None = None  # None: every precision an engine runs here
    batches: list[int] = field(default_factory=lambda: [1, 4, 8])
    duration: float | None = 5.0  # perf seconds per batch size
    iterations: int | None = None  # perf iterations per batch size (instead of duration)
    warmup: int = 20
    engine: str = "auto"
    threads: int | None = None
    class_labels: str | None = None  # class-name file for the build (--labels of quench build)
    calib_count: int = 200
    force: bool = False
    fetch_timeout: float = 10.0
    # where to look for the ImageNet sample; None: the cache (<cache>/data/imagenet-sample),
    # downloaded there when the model is fetched too (no ``model``)
    sample_dirs: list[Path] | None = None
    build_extra: dict[str, Any] = field(default_factory=dict)  # more BuildOptions fields
    progress: bool = True
    plots: bool = True


@dataclass
class RunResult:
    out: Path
    steps: list[Step]
    report: ReportDoc
    files: dict[str, Path]

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed


# -- hashing helpers ----------------------------------------------------------------------------


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sig(path: str | Path) -> list[Any]:
    p = Path(path)
    try:
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(p), None, None]


def _images_sig(paths: list[Path]) -> str:
    return _sha([_file_sig(p) for p in paths])


# -- sample data --------------------------------------------------------------------------------


def sample_dirs(opts: RunOptions) -> list[Path]:
    """Where the ImageNet sample is looked for (in order): ``--sample-dir``, else the cache."""
    if opts.sample_dirs is not None:
        return [Path(p) for p in opts.sample_dirs]
    return [cached_sample_dir()]


def sample_file(name: str, opts: RunOptions) -> tuple[Path | None, list[Path]]:
    """The first ``<sample dir>/name`` that exists, and every place looked."""
    looked = [d / name for d in sample_dirs(opts)]
    return next((p for p in looked if p.is_file()), None), looked


def _where(looked: list[Path]) -> str:
    return ", ".join(str(p) for p in looked) or "nowhere (no sample folders)"


@dataclass
class Calibration:
    """The INT8 calibration images chosen and where they come from."""

    images: str
    source: str  # --calib-images | ImageNet sample | synthetic
    note: str  # one line for the log and the report


def takes_images(precision: str) -> bool:
    """Whether a build gets the job's calibration images: INT8 always; bf16 / fp16 for their
    fidelity gate and repair (on synthetic images, for the gate alone: :func:`half_options`)."""
    p = Precision.parse(precision)
    return p.is_int8 or p.family == "half"


def half_options(precision: str, calib_source: str) -> dict[str, Any]:
    """A bf16 / fp16 build gated on synthetic images is a speed-only row: INT8's bound there,
    and no repair (it would slow the row for an accuracy nobody measures). Random input, the
    other choice, puts a synthetic-weight ResNet-50's top classes so close that bf16 rounding
    swaps them (75% agreement on a Zen 4/5 CPU, below any bound)."""
    if Precision.parse(precision).family != "half" or calib_source != "synthetic":
        return {}
    return {"repair": False, "min_top1_agreement": DEFAULT_MIN_TOP1_AGREEMENT}


def choose_calibration(opts: RunOptions) -> Calibration:
    """``--calib-images`` > the sample's ``calib.txt`` > deterministic synthetic images (made in
    the cache on first use: ``calib_count`` to calibrate on plus the held-out share)."""
    if opts.calib_images is not None:
        path = str(opts.calib_images)
        return Calibration(path, "--calib-images", f"INT8 calibration images: {path}")
    found, looked = sample_file("calib.txt", opts)
    if found:
        return Calibration(
            str(found), "ImageNet sample", f"INT8 calibration images: {found} (ImageNet sample)"
        )
    count = opts.calib_count + opts.calib_count // (HOLDOUT_EVERY - 1)
    try:
        folder = synthetic_images(count, progress=opts.progress)
    except QuenchError as exc:
        raise QuenchError(
            f"no --calib-images, no ImageNet sample calib.txt (looked in {_where(looked)}) "
            f"and {exc}"
        ) from None
    return Calibration(
        str(folder),
        "synthetic",
        f"INT8 calibration: no --calib-images and no ImageNet sample calib.txt (looked in "
        f"{_where(looked)}), so INT8 is calibrated on deterministic synthetic images ({folder}, "
        "made as its SYNTHETIC.txt says): its speed is real, its accuracy unknown",
    )


GET_ACCURACY = (
    "`quench fetch imagenet-sample` then run again, or pass --images DIR_OR_LIST "
    "--labels gt.tsv (and --calib-images LIST)"
)


# -- state --------------------------------------------------------------------------------------


class State:
    def __init__(self, path: Path, force: bool) -> None:
        self.path = path
        self.steps: dict[str, dict[str, Any]] = {}
        if not force and path.is_file():
            try:
                doc = json.loads(path.read_text())
                if doc.get("version") == STATE_VERSION:
                    self.steps = dict(doc.get("steps", {}))
            except (OSError, ValueError):
                self.steps = {}

    def get(self, step_id: str, kind: str, key: str) -> StepResult | None:
        """The stored result of ``step_id`` for ``key``; None when there is none or it cannot
        be read as its kind's record (then the step runs again)."""
        entry = self.steps.get(step_id)
        if not entry or entry.get("key") != key:
            return None
        try:
            return RECORDS[kind].from_dict(entry["result"])
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, step_id: str, key: str, result: StepResult, seconds: float) -> None:
        self.steps[step_id] = {"key": key, "result": result.to_dict(), "seconds": round(seconds, 3)}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        doc = {"version": STATE_VERSION, "quench_version": __version__, "steps": self.steps}
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


# -- the job ------------------------------------------------------------------------------------


class _Job:
    def __init__(self, opts: RunOptions, log: Log, on_classified: OnClassified | None) -> None:
        self.opts = opts
        self.say = log
        self.on_classified = on_classified
        self.out = Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = State(self.out / "state.json", opts.force)
        self.steps: list[Step] = []
        self.notes: list[str] = []  # skipped things and where data was looked for
        self._other_now: float | None = None  # cores other programs use, sampled once

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.say(msg)

    def step(
        self,
        step: Step,
        key: str | None,
        work: Callable[[], Any],
        valid: Callable[[Any], bool] = lambda r: True,
        describe: Callable[[Any], str] = lambda r: "",
    ) -> Step:
        """Run ``work`` unless the state holds a valid result for ``key``."""
        self.steps.append(step)
        label = f"[{step.kind}{' ' + step.precision if step.precision else ''}]"
        cached = self.state.get(step.id, step.kind, key) if key else None
        if cached is not None and valid(cached):
            step.status, step.result = "reused", cached
            step.seconds = float(self.state.steps[step.id].get("seconds", 0.0))
            extra = describe(cached)
            self.say(f"{label} reused (inputs unchanged){': ' + extra if extra else ''}")
            return step
        self.say(f"{label} running ...")
        t = time.perf_counter()
        try:
            step.result = work()
            step.status = "ok"
        except KeyboardInterrupt:
            raise
        except QuenchError as exc:
            step.status, step.message = "failed", " ".join(str(exc).split())
        except Exception as exc:  # a bug or an engine failure: report it, go on
            step.status = "failed"
            step.message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
        step.seconds = round(time.perf_counter() - t, 3)
        if step.status == "ok":
            if key:
                self.state.put(step.id, key, step.result, step.seconds)
            extra = describe(step.result)
            self.say(f"{label} done in {step.seconds:.1f} s{': ' + extra if extra else ''}")
        else:
            self.say(f"{label} FAILED after {step.seconds:.1f} s: {step.message}")
        return step

    def skip(self, kind: str, precision: str | None, why: str) -> Step:
        step = Step(f"{kind}:{precision}" if precision else kind, kind, precision, "skipped")
        step.message = why
        self.steps.append(step)
        self.say(f"[{kind}{' ' + precision if precision else ''}] skipped: {why}")
        return step

    # -- (1) model ------------------------------------------------------------------------------
    def model(self) -> tuple[Path, str] | None:
        opts = self.opts
        step = Step("model", "model")

        def work() -> ModelSource:
            if opts.model is not None:
                path = Path(opts.model)
                if not path.is_file():
                    raise QuenchError(f"{path}: no such model file")
                sig = _file_sig(path)
                old = self.state.steps.get("model", {}).get("result", {})
                if not opts.force and old.get("signature") == sig:
                    sha = old["sha256"]  # same file, same size and mtime: no need to re-hash
                else:
                    sha = sha256_file(path)
                return ModelSource(str(path), sha, sig, "--model")
            name = opts.preset or DEFAULT_PRESET
            try:
                res = fetch_model(name, timeout=opts.fetch_timeout, progress=opts.progress)
            except FetchError as exc:
                msg = str(exc)
                if "--model" not in msg:
                    msg += "; or pass --model PATH"
                raise FetchError(msg) from None
            source = "cache" if res.cached else f"downloaded from {res.url}"
            return ModelSource(str(res.path), res.sha256, _file_sig(res.path), source)

        self.step(
            step,
            None,
            work,
            describe=lambda r: f"{r.path} ({r.source}, sha256 {r.sha256[:12]}...)",
        )
        if not isinstance(step.result, ModelSource):
            return None
        self.state.put("model", "-", step.result, step.seconds)
        return Path(step.result.path), step.result.sha256

    # -- (2) build ------------------------------------------------------------------------------
    def precisions(self) -> list[str]:
        if self.opts.precisions:
            for p in self.opts.precisions:
                Precision.parse(p)  # unknown names: a one-line QuenchError
            return list(self.opts.precisions)
        chosen = []
        for p in NAMES:
            try:
                candidate_engines(self.opts.engine, p)
                chosen.append(p)
            except QuenchError as exc:
                self.note(f"precision {p} skipped: {exc}")
        return chosen

    # -- (1b) the ImageNet sample ---------------------------------------------------------------
    def sample(self, int8: bool) -> None:
        """Fetch the ImageNet sample into the cache when the job fetched its model, looks in the
        cache, lacks the sample and needs it (for calibration or accuracy). Offline or on a bad
        download the job goes on without it (the step is skipped, saying why)."""
        opts = self.opts
        wanted = (int8 and opts.calib_images is None) or opts.images is None
        if opts.model is not None or opts.sample_dirs is not None or not wanted:
            return
        if cached_sample() is not None:
            return
        self.say("[sample] running ...")
        t = time.perf_counter()
        try:
            got = fetch_sample(timeout=opts.fetch_timeout, progress=opts.progress)
        except FetchError as exc:
            self.skip("sample", None, f"ImageNet sample not available: {exc}")
            return
        step = Step("sample", "sample", None, "ok", round(time.perf_counter() - t, 3))
        step.result = SampleRecord(str(got.root), got.images)
        self.steps.append(step)
        self.say(f"[sample] done in {step.seconds:.1f} s: {got.images} images in {got.root}")

    def calibration(self) -> tuple[str | None, str, str]:
        """(images, where they come from, why there are none)."""
        try:
            chosen = choose_calibration(self.opts)
        except QuenchError as exc:
            return None, "", str(exc)
        self.note(chosen.note)
        return chosen.images, chosen.source, ""

    def build(
        self,
        src: Path,
        src_sha: str,
        precision: str,
        calib: str | None,
        calib_why: str,
        calib_source: str = "",
    ) -> Step:
        opts = self.opts
        int8 = Precision.parse(precision).is_int8
        gated = takes_images(precision)
        bo = BuildOptions(
            precision=precision,
            preset=opts.preset,
            labels=opts.class_labels,
            engine=opts.engine,
            threads=opts.threads,
            calib_images=calib if gated else None,
            calib_count=opts.calib_count,
            progress=opts.progress,
            # perf times several batch sizes: mutable wherever a checked form of the graph is
            **{
                "dynamic_batch": IF_POSSIBLE,
                **half_options(precision, calib_source),
                **opts.build_extra,
            },
        )
        settings = {k: v for k, v in asdict(bo).items() if k not in ("progress",)}
        if bo.input == "float32":  # the default: steps recorded before --input existed match
            del settings["input"]
        inputs: dict[str, Any] = {
            "source_sha256": src_sha,
            "precision": precision,
            "options": settings,
            "quench": __version__,
        }
        if opts.class_labels:
            inputs["class_labels"] = _file_sig(opts.class_labels)
        if gated and calib:
            try:
                inputs["calib"] = _images_sig(list_images(calib)[: opts.calib_count])
            except QuenchError:
                inputs["calib"] = _file_sig(calib)
        out = self.out / "artifacts" / f"{precision}.quench"

        def work() -> BuildRecord:
            if int8 and not calib:
                raise QuenchError(f"{precision} needs calibration images: {calib_why}")
            t = time.perf_counter()
            out.parent.mkdir(parents=True, exist_ok=True)  # builds create no folders
            m = do_build(src, out, bo, log=lambda s: self.say(f"  {s}"))
            wall = time.perf_counter() - t
            man = m.spec
            m.close()
            return BuildRecord(
                artifact=str(out),
                sha256=sha256_file(out),
                size_bytes=out.stat().st_size,
                content_digest=man.content_digest,
                name=man.name,
                engine=man.engine.name,
                engine_version=man.engine.version,
                computes=man.precision.info.get("computes"),
                fidelity=man.fidelity,
                build_seconds=round(wall, 3),
                timings=man.timings or {},
            )

        def valid(r: BuildRecord) -> bool:
            return out.is_file() and sha256_file(out) == r.sha256

        step = self.step(
            Step(f"build:{precision}", "build", precision),
            _sha(inputs),
            work,
            valid,
            lambda r: (
                f"{r.artifact} ({r.size_bytes / 1e6:.2f} MB, {r.engine}, "
                f"built in {r.build_seconds:.1f} s)"
            ),
        )
        if step.status == "reused":  # the folder may have moved since
            step.result = replace(step.result, artifact=str(out))
        if int8 and step.status in ("ok", "reused"):
            step.result = replace(step.result, calibration=calib_source)
        return step

    # -- (3) classify ---------------------------------------------------------------------------
    def classify(self, precision: str, build: BuildRecord, images: list[Path]) -> Step:
        sample = images[:SAMPLE_COUNT]
        key = _sha(
            {
                "digest": build.content_digest,
                "images": _images_sig(sample),
                "quench": __version__,
            }
        )

        def work() -> ClassifyRecord:
            with Model.load(build.artifact, threads=self.opts.threads) as m:
                preds = [p.to_dict() for p in m.classify(sample, topk=TOPK)]
            return ClassifyRecord.from_dict({"predictions": preds})  # scores as stored

        step = self.step(Step(f"classify:{precision}", "classify", precision), key, work)
        if isinstance(step.result, ClassifyRecord) and self.on_classified:
            self.on_classified(precision, step.result.predictions)
        return step

    # -- (4) eval -------------------------------------------------------------------------------
    def evaluate(
        self, precision: str, build: BuildRecord, images: str | Path, labels: str | Path
    ) -> Step:
        try:
            paths = list_images(images)
            img_sig = _images_sig(paths)
        except QuenchError:
            paths, img_sig = [], _file_sig(images)
        key = _sha(
            {
                "digest": build.content_digest,
                "images": img_sig,
                "labels": _file_sig(labels),
                "threads": self.opts.threads,
                "quench": __version__,
            }
        )

        def work() -> EvalRecord:
            truth = read_ground_truth(labels)
            todo = paths or list_images(images)
            if not todo:
                raise QuenchError(f"{images}: no images")
            with (
                Model.load(build.artifact, threads=self.opts.threads) as m,
                Bar(f"evaluating {precision}", len(todo), enabled=self.opts.progress) as bar,
            ):
                res = evaluate(m, todo, truth, on_done=lambda p: bar.advance())
                meta = {"model": m.name, "precision": m.precision, "engine": m.engine}
                batch = m.batch_size
            return EvalRecord(**meta, **res.summary(), batch=batch, failed_images=res.failed[:20])

        return self.step(
            Step(f"eval:{precision}", "eval", precision),
            key,
            work,
            describe=lambda r: f"top-1 {r.top1:.4f} top-5 {r.top5:.4f} ({r.images} images)",
        )

    # -- (5) perf -------------------------------------------------------------------------------
    def perf(self, precision: str, build: BuildRecord) -> Step:
        opts = self.opts
        key = _sha(
            {
                "digest": build.content_digest,
                "batches": opts.batches,
                "duration": opts.duration if opts.iterations is None else None,
                "iterations": opts.iterations,
                "warmup": opts.warmup,
                "threads": opts.threads,
                "cpu": cpu_info(),
                "engines": report.engine_versions(),
                "quench": __version__,
            }
        )

        def valid(r: PerfRecord) -> bool:
            why = self._speed_outdated(r.to_dict())
            if why:
                self.say(f"[perf {precision}] measuring again: {why}")
            return why is None

        def work() -> PerfRecord:
            duration = None if opts.iterations is not None else opts.duration
            with Model.load(build.artifact, threads=opts.threads) as m:
                batches = opts.batches
                if m.fixed_batch and batches != [m.fixed_batch]:
                    self.say(
                        f"[perf {precision}] the model runs only at batch {m.fixed_batch}: "
                        f"timing that batch alone"
                    )
                    batches = [m.fixed_batch]
                res = perf_model(m, batches, opts.iterations, duration, opts.warmup, opts.progress)
            return PerfRecord(res)

        return self.step(
            Step(f"perf:{precision}", "perf", precision),
            key,
            work,
            valid,
            describe=lambda r: ", ".join(f"batch {x.batch}: {x.qps:.1f} qps" for x in r.results),
        )

    def _speed_outdated(self, stored: dict[str, Any]) -> str | None:
        """Why stored speed figures (same artifact, CPU, engine and Quench versions: the key)
        should be measured again: they were unstable, or other programs' load changed."""
        results = stored.get("results") or []
        warnings = [w for r in results for w in r.get("warnings", [])]
        if warnings:
            return f"the stored figures were unstable ({warnings[0]})"
        if not results or "qps_spread" not in results[0]:
            return "the stored figures have no rounds"
        if self._other_now is None:
            self._other_now = other_work_now()
        return load_changed(results[0].get("machine_load"), self._other_now)

    # -- everything -----------------------------------------------------------------------------
    def look_up(self, name: str, what: str, missing: str) -> Path | None:
        """A file of the ImageNet sample, noting where it was found or where we looked."""
        found, looked = sample_file(name, self.opts)
        if found:
            self.note(f"{what}: {found} (ImageNet sample)")
        else:
            self.note(f"{missing} (looked in {_where(looked)})")
        return found

    def eval_data(self, synthetic: bool) -> tuple[str | Path | None, str | Path | None, str, str]:
        """(images, labels, why accuracy is not measured, that and how to get it in one line);
        the last two are "" when it is measured."""
        opts = self.opts
        images, labels = opts.images, opts.labels
        if images is None:
            images = self.look_up("val.txt", "images", "no --images and no ImageNet sample val.txt")
        if labels is None and opts.images is None and images is not None and not synthetic:
            labels = self.look_up(
                "ground_truth.tsv", "ground truth", "no --labels and no sample ground_truth.tsv"
            )
        if images is not None and labels is not None:
            return images, labels, "", ""
        if synthetic and labels is None:
            why = (
                "the model has synthetic weights (quench zoo synth), its accuracy means nothing "
                "(--labels measures it anyway)"
            )
            how = (
                "`quench run` online without --model (downloads the real model and the ImageNet "
                "sample), or --model REAL.onnx"
            )
            if images is None:
                how += " with `quench fetch imagenet-sample` or --images/--labels"
        elif images is None:
            why, how = "no --images and no ImageNet sample found", GET_ACCURACY
        else:
            why, how = "no labels for the evaluation images", "pass --labels gt.tsv"
        line = f"Accuracy not measured: {why}. For real top-1/top-5: {how}."
        self.note(line)
        return images, labels, why, line

    def run(self) -> RunResult:
        opts = self.opts
        started = time.perf_counter()
        self.say(f"quench run -> {self.out} (state: {self.state.path})")
        if opts.force:
            self.say("--force: every step is redone")
        precisions: list[str] = []
        builds: dict[str, BuildRecord] = {}
        data: DataSources | None = None
        got = self.model()
        if got is not None:
            try:
                precisions = self.precisions()
            except QuenchError as exc:
                self.steps.append(Step("precisions", "build", None, "failed", 0.0, str(exc)))
                self.say(f"[build] FAILED: {exc}")
            src, src_sha = got
            calib, calib_source, calib_why = None, "", ""
            int8 = any(is_int8(p) for p in precisions)
            # bf16 / fp16 builds take the images too: their fidelity gate and repair run on them
            half = any(Precision.parse(p).family == "half" for p in precisions)
            self.sample(int8 or half)
            if int8 or half:
                calib, calib_source, calib_why = self.calibration()
            if int8 and calib is None:
                if opts.precisions:  # asked for explicitly: those builds fail
                    self.note(f"INT8 builds will fail: {calib_why}")
                else:
                    self.note(f"INT8 builds skipped: {calib_why}")
                    for p in [p for p in precisions if is_int8(p)]:
                        self.skip("build", p, calib_why)
                    precisions = [p for p in precisions if not is_int8(p)]
            for p in precisions:
                step = self.build(src, src_sha, p, calib, calib_why, calib_source)
                if isinstance(step.result, BuildRecord):
                    builds[p] = step.result

            # inputs for classify / eval
            images, labels, no_accuracy, accuracy_note = self.eval_data(_is_synthetic(src))
            data = DataSources(
                calibration=calib_source or None,
                calibration_images=calib,
                evaluation_images=str(images) if images is not None else None,
                labels=str(labels) if labels is not None else None,
                accuracy_note=accuracy_note or None,
            )
            sample: list[Path] = []
            if images is not None:
                try:
                    sample = list_images(images)[:SAMPLE_COUNT]
                except QuenchError as exc:
                    self.steps.append(Step("images", "classify", None, "failed", 0.0, str(exc)))
                    self.say(f"[classify] FAILED: {exc}")
            first_of: dict[str, str] = {}  # artifact sha256 -> the first precision built so
            for p in precisions:
                if p not in builds:
                    for kind in ("classify", "eval", "perf"):
                        self.skip(kind, p, "build did not succeed")
                    continue
                same = first_of.setdefault(builds[p].sha256, p)
                if same != p:  # byte-identical: its figures are the first one's
                    for kind in ("classify", "eval", "perf"):
                        self.skip(kind, p, f"same artifact as {same} (byte-identical)")
                    continue
                if sample:
                    self.classify(p, builds[p], sample)
                else:
                    self.skip("classify", p, "no images")
                if images is not None and labels is not None:
                    self.evaluate(p, builds[p], images, labels)
                else:
                    self.skip("eval", p, f"accuracy not measured: {no_accuracy}")
                self.perf(p, builds[p])

        t = time.perf_counter()
        record = report.JobRecord(
            options=asdict(opts),
            steps=list(self.steps),
            notes=self.notes,
            builds=builds,
            precisions=precisions,
            data=data,
        )
        doc = report.collect(record)
        doc.total_seconds = round(time.perf_counter() - started, 3)
        files: dict[str, Path] = {}
        rstep = Step("report", "report")
        try:
            files = report.write(doc, self.out, plots=opts.plots)
            rstep.status = "ok"
        except Exception as exc:  # the report must not hide the job's results
            rstep.status, rstep.message = "failed", f"{type(exc).__name__}: {exc}"
            files = {"json": report.write_json(doc, self.out / "report.json")}
        rstep.seconds = round(time.perf_counter() - t, 3)
        self.steps.append(rstep)
        if rstep.status == "ok":
            self.say(
                f"[report] done in {rstep.seconds:.1f} s: " + ", ".join(map(str, files.values()))
            )
        else:
            self.say(f"[report] FAILED: {rstep.message}")
        failed = [s for s in self.steps if s.status == "failed"]
        self.say(
            f"finished in {time.perf_counter() - started:.1f} s: "
            + (f"{len(failed)} step(s) failed" if failed else "every step succeeded")
        )
        return RunResult(self.out, self.steps, doc, files)


def _is_synthetic(path: str | Path) -> bool:
    """Whether the model is a ``quench zoo synth`` replica (its producer name says so)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable models fail later, in the build step, with a clear line
        return False
    return model.producer_name == "quench-synth"


def run_job(
    options: RunOptions | None = None,
    log: Log | None = None,
    on_classified: OnClassified | None = None,
    **kwargs: Any,
) -> RunResult:
    """Run the whole job; returns every step's outcome and the report's figures.

    ``log`` gets the progress lines (default: stderr); ``on_classified`` gets each
    precision's top-k of the sample images (the CLI prints them).
    """
    opts = options or RunOptions(**kwargs)
    return _Job(opts, log or _stderr, on_classified).run()
