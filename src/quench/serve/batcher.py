"""The dynamic batcher: the one place requests are grouped into engine calls.

One queue and one worker task per model. The worker takes the first waiting request, waits at
most ``max_delay`` for more until ``max_batch`` images, concatenates them, runs the engine on the
model's single engine thread (the event loop never blocks) and hands each request its rows.
A request of more than ``max_batch`` images is split into chunks that queue separately.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import numpy as np

from quench.serve.errors import QueueFull, ShuttingDown
from quench.serve.metrics import Metrics


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, int]]


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
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"quench-engine-{self.name}")
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def run_on_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on this model's engine thread (e.g. warm-up)."""
        self.start()
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Model outputs for ``x`` (N rows) and the largest engine batch they ran in."""
        if self._closing:
            raise ShuttingDown(self.name)
        self.start()
        chunks = [x[i : i + self.max_batch] for i in range(0, len(x), self.max_batch)]
        if len(self._queue) + len(chunks) > self.max_queue:
            raise QueueFull(self.name)
        loop = asyncio.get_running_loop()
        futures = []
        for chunk in chunks:
            fut: asyncio.Future[tuple[np.ndarray, int]] = loop.create_future()
            self._queue.append(_Item(chunk, fut))
            futures.append(fut)
        self._gauge()
        self._wakeup.set()
        try:
            results = await asyncio.gather(*futures)
        except BaseException:
            for fut in futures:
                fut.cancel()  # timed out or failed: the worker skips what is left
            raise
        if len(results) == 1:
            return results[0]
        return np.concatenate([r[0] for r in results]), max(r[1] for r in results)

    async def close(self) -> None:
        """Refuse new requests, answer every queued one, then stop the engine thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # -- worker ----------------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))

    async def _next_batch(self) -> list[_Item] | None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._queue.popleft()
            if not first.future.done():
                break
        items, n = [first], len(first.x)
        deadline = loop.time() + self.max_delay_s
        while n < self.max_batch:
            if self._queue:
                nxt = self._queue[0]
                if nxt.future.done():
                    self._queue.popleft()
                    continue
                if n + len(nxt.x) > self.max_batch:
                    break
                items.append(self._queue.popleft())
                n += len(nxt.x)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or self._closing:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._next_batch()
            self._gauge()
            if items is None:
                return
            n = sum(len(it.x) for it in items)
            x = items[0].x if len(items) == 1 else np.concatenate([it.x for it in items])
            t0 = perf_counter()
            try:
                y = await loop.run_in_executor(self._executor, self.predict, x)
            except Exception as exc:
                for it in items:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            if self.metrics:
                self.metrics.batch_size.labels(self.name).observe(n)
                self.metrics.inference.labels(self.name).observe(perf_counter() - t0)
            off = 0
            for it in items:
                k = len(it.x)
                if not it.future.done():
                    it.future.set_result((y[off : off + k], n))
                off += k
