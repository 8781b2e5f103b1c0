"""Awaiting with a time limit, cheaply (several times per request on the hot path).

``asyncio.timeout`` (Python 3.11+) runs the awaitable in the caller's task; ``asyncio.wait_for``
before 3.11 wraps it in a task of its own on every call. Either raises ``asyncio.TimeoutError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")
_timeout = getattr(asyncio, "timeout", None)


async def within(seconds: float, aw: Awaitable[T]) -> T:
    """``await aw``, or ``asyncio.TimeoutError`` after ``seconds`` (it is then cancelled)."""
    if _timeout is None:  # Python 3.10
        return await asyncio.wait_for(aw, seconds)
    async with _timeout(seconds):
        return await aw
