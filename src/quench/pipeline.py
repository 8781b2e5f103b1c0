"""Image files -> decode/resize on worker threads -> batched inference -> top-k, in input order.

Decoding, resizing and normalising (Pillow and NumPy release the GIL) run on worker threads,
straight into the next batch buffers, while the engine runs the current batch; a bounded number
of images is in flight, so memory stays flat however many files are given. A file that cannot
be read becomes a ``Prediction`` with ``error`` set and never stops the run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quench.errors import ImageError
from quench.hw import default_threads
from quench.imaging import Normalizer, load_pixels

if TYPE_CHECKING:
    from quench.model import Model


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


def _name(src: str | Path | bytes, i: int) -> str:
    return f"<image {i}>" if isinstance(src, bytes | bytearray) else str(src)


@dataclass
class _Batch:
    """Images being decoded into one batch buffer: slot i of ``buffer`` is ``jobs[i]``."""

    buffer: np.ndarray
    jobs: list[tuple[str, Future[None]]]


def classify(
    model: Model,
    images: Iterable[str | Path | bytes],
    topk: int = 5,
    batch_size: int | None = None,
    workers: int | None = None,
    prefetch: int | None = None,
    on_done: Callable[[Prediction], None] | None = None,
) -> Iterator[Prediction]:
    """Yield a ``Prediction`` per image, in the order given.

    Worker threads decode, resize and normalise each image straight into its slot of a batch
    buffer while the engine runs the batch before; ``prefetch`` images (default: two batches
    or four per worker, whichever is more) are decoded ahead, so memory is bounded by a few
    batch buffers whatever the number of images.
    """
    from quench.model import topk_of

    if topk < 1:
        raise ValueError("topk must be >= 1")
    bs = model.fixed_batch or batch_size or model.batch_size
    workers = workers or default_threads()
    depth = max(1, -(-(prefetch or max(2 * bs, 4 * workers)) // bs))  # batches decoded ahead
    norm = Normalizer(model.data)
    data = model.data
    free = [norm.new_batch(bs) for _ in range(depth + 1)]

    def decode_into(src: str | Path | bytes, out: np.ndarray) -> None:
        norm(load_pixels(src, data), out)

    def finish(batch: _Batch) -> Iterator[Prediction]:
        outcome: list[str | int] = []  # per image: its row among the good ones, or the error
        good = 0
        for slot, (source, fut) in enumerate(batch.jobs):
            try:
                fut.result()
            except ImageError as exc:
                outcome.append(str(exc))
                continue
            except Exception as exc:  # an unexpected decoder failure is still per-image
                outcome.append(f"{source}: {type(exc).__name__}: {exc}")
                continue
            if slot != good:  # close the gap a failed image left
                batch.buffer[good] = batch.buffer[slot]
            outcome.append(good)
            good += 1
        if good:
            idx, val = topk_of(model.scores(model.run_batch(batch.buffer[:good])), topk)
        free.append(batch.buffer)
        for (source, _), row in zip(batch.jobs, outcome, strict=True):
            if isinstance(row, str):
                pred = Prediction(source, error=row)
            else:
                cls = [int(c) for c in idx[row]]
                pred = Prediction(
                    source, cls, [float(s) for s in val[row]], [model.labels[c] for c in cls]
                )
            if on_done:
                on_done(pred)
            yield pred

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
            yield from finish(inflight.popleft())
    finally:
        for batch in inflight:
            for _, fut in batch.jobs:
                fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
