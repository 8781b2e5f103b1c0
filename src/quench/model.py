"""A loaded ``.quench`` artifact: ``predict`` on tensors, ``classify`` on image files."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from quench import artifact, pipeline, selfcheck, signing
from quench.backend import ENGINES, Runner, get_engine
from quench.errors import ArtifactError, EngineError, QuenchError
from quench.manifest import Manifest
from quench.pipeline import Prediction

DEFAULT_DYNAMIC_BATCH = 8


class Model:
    """An artifact with its engine runner (activated on first use)."""

    def __init__(
        self, art: artifact.Artifact, path: Path | None = None, threads: int | None = None
    ) -> None:
        self.artifact = art
        self.path = path
        self.manifest = art.manifest  # the JSON form; ``spec``: the same, typed and validated
        self.spec = Manifest.from_dict(art.manifest, ENGINES, str(path) if path else None)
        self.data = self.spec.preprocess
        self.labels: list[str] = list(self.spec.labels)
        self.input_name: str = self.spec.io.input.name
        self.output_name: str = self.spec.io.output.name
        self.fixed_batch: int | None = self.spec.batch.size
        self.threads = threads
        self._runner: Runner | None = None
        self.selfcheck: Any = None  # quench.selfcheck.Result once a load has checked it
        self.signature: Any = None  # quench.signing.Verified when loaded with trusted keys

    @classmethod
    def load(
        cls,
        path: str | Path,
        threads: int | None = None,
        check: str = "auto",
        trusted_keys: Mapping[str, Any] | None = None,
    ) -> Model:
        """Load an artifact and prove it on this host (see :mod:`quench.selfcheck`).

        ``trusted_keys`` (:func:`quench.signing.trusted_keys`): refuse, before anything of it
        is used, an artifact not signed by one of these keys (:class:`SignatureError`).

        ``check``: ``auto`` runs the artifact's self-check when this host's CPU features,
        ``$ONEDNN_MAX_CPU_ISA`` or engine version differ from the build host's, and raises
        :class:`~quench.selfcheck.SelfCheckError` when it fails; ``always`` runs it in any case;
        ``warn`` runs it like ``auto`` but keeps a failing artifact (``model.selfcheck``
        says so); ``off`` runs nothing.
        """
        if check not in ("auto", "always", "warn", "off"):
            raise QuenchError(f"check must be auto, always, warn or off, got {check!r}")
        art = artifact.load(path)
        verified = None
        if trusted_keys is not None:
            verified = signing.verify(art, dict(trusted_keys), str(path))
        model = cls(art, Path(path), threads=threads)
        model.signature = verified
        if check != "off":
            try:
                model.selfcheck = selfcheck.check(model, always=check == "always")
                if check != "warn":
                    selfcheck.enforce(model, model.selfcheck, str(path))
            except QuenchError as exc:
                model.close()
                msg = str(exc)
                raise type(exc)(msg if msg.startswith(f"{path}: ") else f"{path}: {msg}") from None
            except BaseException:
                model.close()
                raise
        return model

    # -- properties -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def precision(self) -> str:
        return self.spec.precision.mode.name

    @property
    def engine(self) -> str:
        return self.spec.engine.name

    @property
    def batch_size(self) -> int:
        """The batch the engine runs: fixed size, or the default for dynamic-batch models."""
        return self.fixed_batch or DEFAULT_DYNAMIC_BATCH

    def batch_for(self, batch_size: int | None = None) -> int:
        """The batch a call runs: the fixed size, else ``batch_size``, else the dynamic-batch
        default (the one place this rule is written)."""
        return self.fixed_batch or batch_size or self.batch_size

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            where = f"{self.path}: " if self.path else ""
            try:
                runner = get_engine(self.engine).runner(
                    self.artifact.payloads, self.spec.engine.options, threads=self.threads
                )
                runner.activate()
            except EngineError as exc:  # the engine cannot load the payload: a bad artifact
                raise ArtifactError(
                    f"{where}the {self.engine} payload does not load with manifest field "
                    f"'engine.options' {self.spec.engine.options} ({exc})"
                ) from None
            except QuenchError as exc:
                msg = str(exc)
                raise type(exc)(msg if msg.startswith(where) else where + msg) from None
            except Exception as exc:  # whatever the engine raises on a payload it cannot load
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise ArtifactError(
                    f"{where}the {self.engine} payload does not load with manifest field "
                    f"'engine.options' {self.spec.engine.options} ({type(exc).__name__}: {first})"
                ) from None
            self._check_io(runner)
            self._runner = runner
        return self._runner

    def _check_io(self, runner: Runner) -> None:
        """The manifest's tensor names and class count must be the engine payload's (else a
        one-line error naming the field)."""
        where = f"{self.path}: " if self.path else ""
        for field, tensor, metas in (
            ("io.input", self.spec.io.input, runner.inputs()),
            ("io.output", self.spec.io.output, runner.outputs()),
        ):
            names = [t.name for t in metas]
            got = next((t for t in metas if t.name == tensor.name), None)
            problem = None
            if got is None:
                problem = (
                    f"{field}.name",
                    f"{tensor.name!r} is not a tensor of the {self.engine} "
                    f"payload (it has {', '.join(names)})",
                )
            elif field == "io.input" and {got.dtype, tensor.dtype} == {"float32", "uint8"}:
                problem = (
                    f"{field}.dtype",
                    f"{tensor.dtype} does not match the {self.engine} payload's {got.dtype}",
                )
            elif (got.shape and len(got.shape) != len(tensor.shape)) or any(
                isinstance(a, int) and isinstance(b, int) and a != b
                for a, b in zip(got.shape[1:], tensor.shape[1:], strict=False)
            ):
                problem = (
                    f"{field}.shape",
                    f"{list(tensor.shape)} does not match the "
                    f"{self.engine} payload's {list(got.shape)}",
                )
            if problem:
                runner.deactivate()
                raise ArtifactError(f"{where}manifest field {problem[0]!r}: {problem[1]}")

    def close(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tensors ----------------------------------------------------------------------------
    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        """One engine call. Fixed-batch models get a short batch padded and trimmed."""
        n = len(batch)
        if self.fixed_batch and n != self.fixed_batch:
            if n > self.fixed_batch:
                raise QuenchError(
                    f"batch of {n} exceeds the model's fixed batch {self.fixed_batch}"
                )
            pad = np.zeros((self.fixed_batch - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        out = self.runner.infer({self.input_name: batch})[self.output_name]
        return out[:n]

    def predict(self, x: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Model outputs for preprocessed input ``x`` of shape (N, *input_shape), any N: float32
        tensors, or for a ``--input uint8`` artifact uint8 pixels (N, crop, crop, 3) RGB."""
        if self.data.pixels:
            x = np.asarray(x)
            if x.dtype != np.uint8:
                raise QuenchError(
                    f"{self.name} takes uint8 RGB pixels (N, "
                    f"{', '.join(map(str, self.data.input_shape))}) (built with --input uint8), "
                    f"got {x.dtype} input: pass the pixels, not a normalised tensor"
                )
        else:
            x = np.asarray(x, dtype=np.float32)
        if x.ndim == len(self.data.input_shape):
            x = x[None]
        if tuple(x.shape[1:]) != self.data.input_shape:
            raise QuenchError(
                f"input shape {tuple(x.shape)} does not match (N, "
                f"{', '.join(map(str, self.data.input_shape))})"
            )
        step = self.batch_for(batch_size)
        return (
            np.concatenate(
                [
                    self.run_batch(np.ascontiguousarray(x[i : i + step]))
                    for i in range(0, len(x), step)
                ]
            )
            if len(x)
            else np.empty((0, len(self.labels)), np.float32)
        )

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """Class probabilities: softmax of logits, or the outputs as they are."""
        if self.spec.output_kind != "logits":
            return outputs
        z = outputs.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        return z / z.sum(axis=1, keepdims=True)

    # -- images -----------------------------------------------------------------------------
    def classify(
        self,
        images: Iterable[str | Path | bytes],
        topk: int = 5,
        batch_size: int | None = None,
        **pipeline_options: Any,
    ) -> list[Prediction]:
        """Top-k predictions for image files (or encoded bytes), in input order."""
        return list(self.iter_classify(images, topk, batch_size, **pipeline_options))

    def iter_classify(
        self,
        images: Iterable[str | Path | bytes],
        topk: int = 5,
        batch_size: int | None = None,
        workers: int | None = None,
        prefetch: int | None = None,
        on_done: Callable[[Prediction], None] | None = None,
    ) -> Iterator[Prediction]:
        """Yield a ``Prediction`` per image, in the order given; an unreadable image is one
        with ``error`` set. Decoding overlaps inference (see :func:`quench.pipeline.batches`
        for ``workers`` and ``prefetch``)."""
        if topk < 1:
            raise ValueError("topk must be >= 1")
        decoded = pipeline.batches(images, self.data, self.batch_for(batch_size), workers, prefetch)
        with closing(decoded):  # stopping early stops the decoding threads at once
            for batch in decoded:
                if len(batch.pixels):
                    idx, val = topk_of(self.scores(self.run_batch(batch.pixels)), topk)
                row = 0
                for source, error in zip(batch.sources, batch.errors, strict=True):
                    if error is not None:
                        pred = Prediction(source, error=error)
                    else:
                        cls = [int(c) for c in idx[row]]
                        scores = [float(s) for s in val[row]]
                        pred = Prediction(source, cls, scores, [self.labels[c] for c in cls])
                        row += 1
                    if on_done:
                        on_done(pred)
                    yield pred

    def describe(self) -> dict[str, Any]:
        m, records = self.spec, self.manifest  # the build's records: as the builder left them
        return {
            "path": str(self.path) if self.path else None,
            "name": m.name,
            "precision": m.precision.to_dict(),
            "engine": m.engine.to_dict(),
            "batch": m.batch.to_dict(),
            "io": m.io.to_dict(),
            "input": _input_kind(m.preprocess),
            "preprocess": m.preprocess.to_dict(),
            "source": m.source,
            "created": m.created,
            "quench_version": m.quench_version,
            "classes": len(m.labels),
            **{
                k: records[k]
                for k in (
                    "engine_selection",
                    "fidelity",
                    "accuracy",
                    "quantization",
                    "reduced_precision",
                    "selfcheck",
                )
                if k in records
            },
        }


def _input_kind(data: Any) -> str:
    """What the engine takes, in words (``quench info``)."""
    if data.pixels:
        return (
            f"uint8 pixels (N, {data.crop}, {data.crop}, 3) RGB; channel order, mean/std and "
            f"layout ({data.layout}) folded into the engine graph"
        )
    return f"float32 {data.layout}, normalised by the pipeline"


def topk_of(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest scores per row, best first."""
    k = min(k, scores.shape[1])
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1), np.take_along_axis(vals, order, axis=1)
