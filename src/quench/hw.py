"""What this machine is: CPU model, flags, cores."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path


def default_threads() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@cache
def cpu_info() -> dict[str, object]:
    """CPU model name, ISA flags and core count (from /proc/cpuinfo where available)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    interesting = [
        f
        for f in (
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512_vnni",
            "avx512_bf16",
            "avx_vnni",
            "avx512_fp16",
            "amx_bf16",
            "amx_int8",
        )
        if f in flags
    ]
    return {
        "model": model,
        "machine": platform.machine(),
        "cores": default_threads(),
        "flags": interesting,
    }
