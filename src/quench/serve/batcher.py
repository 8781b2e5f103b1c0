"""The dynamic batcher: the one place requests are grouped into engine calls.

One queue and one engine thread per model. The engine thread takes the first waiting request,
waits at most ``max_delay`` for more until ``max_batch`` images, concatenates them, runs the
engine and hands each request its rows (one call onto the event loop per batch). It goes
straight on to the next batch: the requests that arrived meanwhile are already queued, so the
engine never waits for the event loop (which is busy reading and answering requests) between
two batches. A request of more than ``max_batch`` images is split into chunks that queue
separately. Other work for the engine (warm-up) runs on the same thread, in queue order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic, perf_counter
from typing import Any

import numpy as np

from quench.serve.errors import QueueFull, ShuttingDown
from quench.serve.metrics import Metrics


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, int]]


@dataclass
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


def _settle(fut: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    """Complete ``fut`` (on its loop) unless it was cancelled meanwhile."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class Batcher:
    def __init__(
        self,
        name: str,
        predict: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.predict = predict
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: deque[_Item | _Call] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None  # set when the engine thread ends
        self._closing = False
        self._depth = metrics.queue_depth.labels(name) if metrics else None

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._done = self._loop.create_future()
            self._thread = threading.Thread(
                target=self._work, name=f"quench-engine-{self.name}", daemon=True
            )
            self._thread.start()

    async def run_on_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on this model's engine thread (e.g. warm-up)."""
        self.start()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._put([_Call(fn, args, fut)])
        return await fut

    async def submit(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Model outputs for ``x`` (N rows) and the largest engine batch they ran in."""
        if self._closing:
            raise ShuttingDown(self.name)
        self.start()
        chunks = [x[i : i + self.max_batch] for i in range(0, len(x), self.max_batch)]
        if len(self._queue) + len(chunks) > self.max_queue:
            raise QueueFull(self.name)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in chunks]
        self._put([_Item(c, f) for c, f in zip(chunks, futures, strict=True)])
        try:
            if len(futures) == 1:
                return await futures[0]
            results = await asyncio.gather(*futures)
        except BaseException:
            for fut in futures:
                fut.cancel()  # timed out or failed: the engine thread skips what is left
            raise
        return np.concatenate([r[0] for r in results]), max(r[1] for r in results)

    async def close(self) -> None:
        """Refuse new requests, answer every queued one, then stop the engine thread."""
        self._closing = True
        with self._cond:
            self._cond.notify()
        if self._done is not None:
            await self._done

    # -- the engine thread -----------------------------------------------------------------
    def _put(self, items: list[_Item | _Call]) -> None:
        with self._cond:
            self._queue.extend(items)
            self._cond.notify()
        self._gauge()

    def _gauge(self) -> None:
        if self._depth is not None:
            self._depth.set(len(self._queue))

    def _next(self) -> list[_Item] | _Call | None:
        """The next batch (or call), None once closing with nothing queued."""
        with self._cond:
            while True:
                while not self._queue:
                    if self._closing:
                        return None
                    self._cond.wait()
                first = self._queue.popleft()
                if isinstance(first, _Call):
                    return first
                if not first.future.done():  # not cancelled (timed out) while queued
                    break
            items, n = [first], len(first.x)
            deadline = monotonic() + self.max_delay_s
            while n < self.max_batch:
                if self._queue:
                    nxt = self._queue[0]
                    if isinstance(nxt, _Call) or n + len(nxt.x) > self.max_batch:
                        break
                    self._queue.popleft()
                    if not nxt.future.done():
                        items.append(nxt)
                        n += len(nxt.x)
                    continue
                remaining = deadline - monotonic()
                if remaining <= 0 or self._closing:
                    break
                self._cond.wait(remaining)
            return items

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` on the event loop (nothing if the loop has already closed)."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits for it
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]

    def _work(self) -> None:
        try:
            while (job := self._next()) is not None:
                self._gauge()
                if isinstance(job, _Call):
                    try:
                        self._post(_settle, job.future, job.fn(*job.args))
                    except Exception as exc:
                        self._post(_settle, job.future, None, exc)
                    continue
                self._batch(job)
        finally:
            self._post(_settle, self._done)

    def _batch(self, items: list[_Item]) -> None:
        n = sum(len(it.x) for it in items)
        t0 = perf_counter()
        try:
            x = items[0].x if len(items) == 1 else np.concatenate([it.x for it in items])
            y = self.predict(x)
        except Exception as exc:
            self._post(self._fail, items, exc)
            return
        if self.metrics:
            self.metrics.batch_size.labels(self.name).observe(n)
            self.metrics.inference.labels(self.name).observe(perf_counter() - t0)
        self._post(self._answer, items, y, n)

    @staticmethod
    def _answer(items: list[_Item], y: np.ndarray, n: int) -> None:
        off = 0
        for it in items:
            k = len(it.x)
            _settle(it.future, (y[off : off + k], n))
            off += k

    @staticmethod
    def _fail(items: list[_Item], exc: Exception) -> None:
        for it in items:
            _settle(it.future, None, exc)
