"""The dynamic batcher on its own: batching, the engine thread, cancellation, draining."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from quench.serve.batcher import Batcher
from quench.serve.errors import QueueFull, ShuttingDown


class Engine:
    """A fake engine that records each batch and the thread it ran on."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        self.batches.append(len(x))
        self.threads.add(threading.current_thread().name)
        return x[:, :1] * 2


def rows(n: int, start: int = 0) -> list[np.ndarray]:
    return [np.full((1, 3), i, np.float32) for i in range(start, start + n)]


def test_requests_are_batched_and_answered_with_their_rows() -> None:
    engine = Engine()

    async def go() -> list[tuple[np.ndarray, int]]:
        b = Batcher("m", engine, max_batch=4, max_delay_s=0.05, max_queue=64)
        out = await asyncio.gather(*(b.submit(x) for x in rows(10)))
        await b.close()
        return out

    out = asyncio.run(go())
    assert [float(y[0, 0]) for y, _ in out] == [2.0 * i for i in range(10)]
    assert sum(engine.batches) == 10
    assert max(engine.batches) == 4
    assert engine.threads == {"quench-engine-m"}


def test_the_engine_does_not_wait_for_a_busy_event_loop() -> None:
    """Batch after batch runs while the loop is blocked: the engine thread forms them."""
    engine = Engine(delay=0.05)

    async def go() -> list[int]:
        b = Batcher("m", engine, max_batch=4, max_delay_s=0.0, max_queue=64)
        tasks = [asyncio.ensure_future(b.submit(x)) for x in rows(12)]
        await asyncio.sleep(0)  # the submits queue their rows
        time.sleep(0.5)  # the event loop is busy (reading requests, say)
        during = list(engine.batches)
        await asyncio.gather(*tasks)
        await b.close()
        return during

    assert asyncio.run(go()) == [4, 4, 4]


def test_a_split_request_and_warmup_on_the_engine_thread() -> None:
    engine = Engine()

    async def go() -> tuple[np.ndarray, int, str]:
        b = Batcher("m", engine, max_batch=4, max_delay_s=0.0, max_queue=64)
        name = await b.run_on_engine(lambda: threading.current_thread().name)
        y, n = await b.submit(np.arange(30, dtype=np.float32).reshape(10, 3))
        await b.close()
        return y, n, name

    y, n, name = asyncio.run(go())
    assert y[:, 0].tolist() == [6.0 * i for i in range(10)]
    assert n == 4
    assert name == "quench-engine-m"


def test_cancelled_requests_are_skipped_and_close_drains_the_rest() -> None:
    engine = Engine(delay=0.1)

    async def go() -> tuple[list[object], BaseException | None]:
        b = Batcher("m", engine, max_batch=1, max_delay_s=0.0, max_queue=2)
        first = asyncio.ensure_future(b.submit(rows(1)[0]))
        await asyncio.sleep(0.02)  # running on the engine
        gone = asyncio.ensure_future(b.submit(rows(1, 1)[0]))
        kept = asyncio.ensure_future(b.submit(rows(1, 2)[0]))
        await asyncio.sleep(0)
        full = None
        try:
            await b.submit(rows(1, 3)[0])
        except QueueFull as exc:
            full = exc
        gone.cancel()
        await b.close()
        with pytest.raises(ShuttingDown):
            await b.submit(rows(1)[0])
        return [await first, await kept], full

    done, full = asyncio.run(go())
    assert isinstance(full, QueueFull)
    assert float(done[1][0][0, 0]) == 4.0
    assert engine.batches == [1, 1]  # the cancelled request never ran


def test_an_engine_error_reaches_every_request_of_its_batch() -> None:
    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("engine fell over")

    async def go() -> list[object]:
        b = Batcher("m", broken, max_batch=4, max_delay_s=0.05, max_queue=64)
        out = await asyncio.gather(*(b.submit(x) for x in rows(3)), return_exceptions=True)
        await b.close()
        return out

    assert [str(e) for e in asyncio.run(go())] == ["engine fell over"] * 3
