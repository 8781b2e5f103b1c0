"""Image files -> decode/resize on worker threads -> batched inference -> top-k, in input order.

Decoding (Pillow releases the GIL) overlaps with inference; at most ``prefetch`` images are in
flight, so memory stays flat however many files are given. A file that cannot be read becomes a
``Prediction`` with ``error`` set and never stops the run.
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


def classify(
    model: Model,
    images: Iterable[str | Path | bytes],
    topk: int = 5,
    batch_size: int | None = None,
    workers: int | None = None,
    prefetch: int | None = None,
    on_done: Callable[[Prediction], None] | None = None,
) -> Iterator[Prediction]:
    """Yield a ``Prediction`` per image, in the order given."""
    from quench.model import topk_of

    if topk < 1:
        raise ValueError("topk must be >= 1")
    bs = model.fixed_batch or batch_size or model.batch_size
    workers = workers or default_threads()
    prefetch = prefetch or max(2 * bs, 4 * workers)
    norm = Normalizer(model.data)
    buf = norm.new_batch(bs)

    def flush(pending: list[tuple[str, int | str]], filled: int) -> Iterator[Prediction]:
        if filled:
            idx, val = topk_of(model.scores(model.run_batch(buf[:filled])), topk)
        for source, slot in pending:
            if isinstance(slot, str):
                pred = Prediction(source, error=slot)
            else:
                cls = [int(c) for c in idx[slot]]
                pred = Prediction(
                    source, cls, [float(s) for s in val[slot]], [model.labels[c] for c in cls]
                )
            if on_done:
                on_done(pred)
            yield pred

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="quench-decode")
    inflight: deque[tuple[str, Future[np.ndarray]]] = deque()
    it = iter(enumerate(images))
    try:
        pending: list[tuple[str, int | str]] = []
        filled = 0
        exhausted = False
        while True:
            while not exhausted and len(inflight) < prefetch:
                try:
                    i, src = next(it)
                except StopIteration:
                    exhausted = True
                    break
                inflight.append((_name(src, i), pool.submit(load_pixels, src, model.data)))
            if not inflight:
                break
            source, fut = inflight.popleft()
            try:
                norm(fut.result(), buf[filled])
                pending.append((source, filled))
                filled += 1
            except ImageError as exc:
                pending.append((source, str(exc)))
            except Exception as exc:  # an unexpected decoder failure is still per-image
                pending.append((source, f"{source}: {type(exc).__name__}: {exc}"))
            if filled == bs:
                yield from flush(pending, filled)
                pending, filled = [], 0
        yield from flush(pending, filled)
    finally:
        for _, fut in inflight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
