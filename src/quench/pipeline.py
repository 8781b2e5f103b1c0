"""Image files -> decode/resize on worker threads -> batches of model input, in input order.

Decoding, resizing and normalising (Pillow and NumPy release the GIL) run on worker threads,
straight into the next batch buffers, while the engine runs the current batch; a bounded number
of images is in flight, so memory stays flat however many files are given. A file that cannot
be read is reported in its batch (``Decoded.errors``) and never stops the run. The model
(:meth:`quench.model.Model.iter_classify`) scores each batch and turns it into ``Prediction``s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quench.errors import ImageError
from quench.hw import default_threads
from quench.imaging import Normalizer, load_pixels
from quench.presets import DataConfig


@dataclass
class Prediction:
    """The top-k result for one image, or the reason it could not be classified."""

    source: str
    classes: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.source, "error": self.error}
        return {
            "file": self.source,
            "top": [
                {"class": c, "name": n, "score": round(s, 6)}
                for c, n, s in zip(self.classes, self.names, self.scores, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prediction:
        """The inverse of ``to_dict`` (scores as rounded there)."""
        if "error" in d:
            return cls(d["file"], error=d["error"])
        top = d["top"]
        return cls(
            d["file"],
            [t["class"] for t in top],
            [t["score"] for t in top],
            [t["name"] for t in top],
        )

    def text(self) -> str:
        """The top-k printout (``quench infer``, ``quench run``): the file, then one line per
        class, best first (or the error)."""
        if self.error is not None:
            return f"{self.source}\n  error: {self.error}"
        return "\n".join(
            [self.source]
            + [
                f"  {rank} [{n}] class {c} score {s:.4f}"
                for rank, (c, n, s) in enumerate(
                    zip(self.classes, self.names, self.scores, strict=True)
                )
            ]
        )


def _name(src: str | Path | bytes, i: int) -> str:
    return f"<image {i}>" if isinstance(src, bytes | bytearray) else str(src)


@dataclass
class _Batch:
    """Images being decoded into one batch buffer: slot i of ``buffer`` is ``jobs[i]``."""

    buffer: np.ndarray
    jobs: list[tuple[str, Future[None]]]


@dataclass
class Decoded:
    """One batch of images, decoded and normalised: ``pixels`` holds the readable ones, in
    order; ``errors[i]`` says why image ``sources[i]`` could not be read (None: it is a row of
    ``pixels``). ``pixels`` is a view of a reused buffer, valid until the next batch is asked
    for."""

    sources: list[str]
    errors: list[str | None]
    pixels: np.ndarray


def batches(
    images: Iterable[str | Path | bytes],
    data: DataConfig,
    batch_size: int,
    workers: int | None = None,
    prefetch: int | None = None,
) -> Iterator[Decoded]:
    """Yield the images as ``Decoded`` batches of ``batch_size``, in the order given.

    Worker threads decode, resize and normalise each image straight into its slot of a batch
    buffer while the caller runs the batch before; ``prefetch`` images (default: two batches
    or four per worker, whichever is more) are decoded ahead, so memory is bounded by a few
    batch buffers whatever the number of images.
    """
    bs = batch_size
    workers = workers or default_threads()
    depth = max(1, -(-(prefetch or max(2 * bs, 4 * workers)) // bs))  # batches decoded ahead
    norm = Normalizer(data)
    free = [norm.new_batch(bs) for _ in range(depth + 1)]

    def decode_into(src: str | Path | bytes, out: np.ndarray) -> None:
        norm(load_pixels(src, data), out)

    def finish(batch: _Batch) -> Decoded:
        errors: list[str | None] = []
        good = 0
        for slot, (source, fut) in enumerate(batch.jobs):
            try:
                fut.result()
            except ImageError as exc:
                errors.append(str(exc))
                continue
            except Exception as exc:  # an unexpected decoder failure is still per-image
                errors.append(f"{source}: {type(exc).__name__}: {exc}")
                continue
            if slot != good:  # close the gap a failed image left
                batch.buffer[good] = batch.buffer[slot]
            errors.append(None)
            good += 1
        return Decoded([s for s, _ in batch.jobs], errors, batch.buffer[:good])

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quench-decode")
    inflight: deque[_Batch] = deque()
    it = iter(enumerate(images))
    try:
        exhausted = False
        while True:
            while not exhausted and len(inflight) < depth:
                batch = _Batch(free.pop(), [])
                for i, src in it:
                    out = batch.buffer[len(batch.jobs)]
                    batch.jobs.append((_name(src, i), pool.submit(decode_into, src, out)))
                    if len(batch.jobs) == bs:
                        break
                else:
                    exhausted = True
                if batch.jobs:
                    inflight.append(batch)
                else:
                    free.append(batch.buffer)
            if not inflight:
                break
            done = inflight.popleft()
            yield finish(done)
            free.append(done.buffer)  # the caller is done with it: asked for the next batch
    finally:
        for batch in inflight:
            for _, fut in batch.jobs:
                fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
