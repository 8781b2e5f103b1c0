"""The core clock, measured: a chain of dependent integer adds runs at one add per cycle.

``/proc/cpuinfo`` (and cpufreq in a VM) often reports the base clock while the cores run at
their boost clock, so a share of peak worked out from it is too high. Quench times a chain of
dependent 64-bit adds (each waits for the one before: one per cycle on every x86-64 core)
on this thread's CPU time, best of a few chunks, and caches the figure per host and boot
(``~/.cache/quench/clock.json``). ``$QUENCH_CPU_CLOCK_GHZ`` overrides it. The loop is a few
bytes of x86-64 machine code run through ``ctypes`` (no compiler needed); elsewhere, or where
the system refuses executable memory, the reported clock is used and the method says so.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from quench.cpuinfo import cpuinfo_fields, reported_clock_hz

ADDS = 8  # dependent adds per loop iteration (the loop's counter runs alongside)
ITERATIONS = 25_000_000  # per chunk: 2e8 cycles, ~50 ms at 4 GHz
CHUNKS = 5
PLAUSIBLE_GHZ = (0.2, 8.0)
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class CoreClock:
    """The clock share-of-peak figures use, where it came from and how it was found."""

    hz: float
    source: str  # measured | QUENCH_CPU_CLOCK_GHZ | reported
    how: str

    @property
    def ghz(self) -> float:
        return self.hz / 1e9

    def describe(self) -> str:
        return f"{self.ghz:.3f} GHz, {self.source}: {self.how}"

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "ghz": round(self.ghz, 3)}


def _add_chain_code(adds: int) -> bytes:
    """x86-64 System V: ``uint64 f(uint64 n)`` runs ``n`` iterations of ``adds`` dependent
    ``add rax, 1`` and returns rax (= n * adds, which checks that it ran)."""
    body = bytes([0x48, 0x83, 0xC0, 0x01]) * adds + bytes([0x48, 0xFF, 0xCF])  # add; dec rdi
    jump = -(len(body) + 2)
    if jump < -128:
        raise ValueError("loop too long for a short jump")
    return bytes([0x31, 0xC0]) + body + bytes([0x75, jump & 0xFF, 0xC3])  # xor; ...; jnz; ret


def add_chain(adds: int = ADDS) -> Callable[[int], int]:
    """The timed loop as a callable (raises OSError where it cannot run here)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name != "posix":
        raise OSError(f"no add-chain loop for {platform.machine()} on {os.name}")
    code = _add_chain_code(adds)
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=prot)  # OSError where W+X memory is refused
    buf.write(code)
    fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(
        ctypes.addressof(ctypes.c_char.from_buffer(buf))
    )
    fn._quench_buffer = buf  # type: ignore[attr-defined] - keeps the code mapped
    return fn


def cycles_per_second(fn: Callable[[int], int], adds: int, iterations: int, chunks: int) -> float:
    """Best chunk's dependent adds per second of this thread's CPU time (preemption by other
    programs does not count)."""
    best = 0.0
    for _ in range(chunks):
        t = time.thread_time_ns()
        got = fn(iterations)
        ns = time.thread_time_ns() - t
        if got != iterations * adds:
            raise OSError(f"the add-chain loop returned {got}, expected {iterations * adds}")
        if ns > 0:
            best = max(best, iterations * adds / (ns * 1e-9))
    return best


def measure() -> CoreClock:
    """Time the add chain now (about a quarter of a second); OSError if it cannot run or
    gives an implausible figure."""
    hz = cycles_per_second(add_chain(ADDS), ADDS, ITERATIONS, CHUNKS)
    lo, hi = PLAUSIBLE_GHZ
    if not lo <= hz / 1e9 <= hi:
        raise OSError(f"implausible measured clock {hz / 1e9:.3f} GHz")
    how = (
        f"timed loop of dependent integer adds (1 per cycle; {CHUNKS} chunks of "
        f"{ITERATIONS * ADDS:.0e} on thread CPU time, best chunk)"
    )
    return CoreClock(hz, "measured", how)


def _host_key() -> dict[str, str]:
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        boot = ""
    return {
        "host": socket.gethostname(),
        "boot_id": boot,
        "cpu": cpuinfo_fields().get("model name", ""),
    }


def _cache_file() -> Path:
    from quench.zoo.fetch import cache_dir

    return cache_dir() / "clock.json"


def _cached(key: dict[str, str]) -> CoreClock | None:
    try:
        doc = json.loads(_cache_file().read_text())
        if doc.get("key") == key and key["boot_id"]:
            return CoreClock(float(doc["hz"]), "measured", f"{doc['how']}, cached for this boot")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _store(key: dict[str, str], clock: CoreClock) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "hz": clock.hz, "how": clock.how}) + "\n")
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache: measured again next time


def _override() -> CoreClock | None:
    text = os.environ.get("QUENCH_CPU_CLOCK_GHZ", "").strip()
    try:
        ghz = float(text)
    except ValueError:
        return None
    if 0 < ghz < float("inf"):
        return CoreClock(ghz * 1e9, "QUENCH_CPU_CLOCK_GHZ", f"set to {text}")
    return None


@cache
def core_clock() -> CoreClock:
    """``$QUENCH_CPU_CLOCK_GHZ``, else the measured clock (cached per host and boot), else the
    reported one (with why it was not measured)."""
    if (clock := _override()) is not None:
        return clock
    key = _host_key()
    if (clock := _cached(key)) is not None:
        return clock
    try:
        clock = measure()
    except (OSError, ValueError) as exc:
        hz, where = reported_clock_hz()
        why = f"{where}; not measured ({exc})"
        return CoreClock(hz or 2.5e9, "reported", why if hz else f"unknown, 2.5 GHz assumed; {why}")
    _store(key, clock)
    return clock
