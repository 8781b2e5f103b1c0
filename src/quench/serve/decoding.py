"""The decode pool: the one place request bodies become tensors, a bounded number at once.

Decoding is where a small request can cost a lot of memory (an image's pixels, a JSON tensor's
Python floats), so at most ``workers`` decodes run at a time and each is bounded by the request's
deadline. When the last decode in flight ends, freed heap pages go back to the OS (glibc keeps
them otherwise, and the process would stay at its peak).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from quench.serve.deadline import within

T = TypeVar("T")


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        fn = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None
    return fn  # glibc only; musl and macOS have none


_TRIM = _malloc_trim()


class DecodePool:
    def __init__(self, workers: int) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="quench-decode")
        self._lock = threading.Lock()
        self._running = 0
        self._freed = False  # a large decode ended since the last trim
        self.peak = 0  # most decodes seen running at once (for tests and metrics)

    def _run(self, large: bool, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            self._running += 1
            self.peak = max(self.peak, self._running)
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._running -= 1
                self._freed |= large
                trim = self._running == 0 and self._freed
                if trim:
                    self._freed = False
            if trim and _TRIM is not None:
                _TRIM(0)

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float, large: bool) -> T:
        """``fn(*args)`` on a decode thread; TimeoutError if it has not finished in time
        (a decode still waiting for a thread is dropped, a running one ends on its own).
        ``large``: this decode may leave a lot of freed heap behind (trimmed once idle)."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, self._run, large, fn, *args)
        return await within(timeout, fut)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
