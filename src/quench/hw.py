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
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "flags" and not flags:
                flags = set(value.split())
            elif key and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    model = fields.get("model name", model)
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
    family = fields.get("cpu family")
    return {
        "model": model,
        "vendor": fields.get("vendor_id"),
        "family": int(family) if family and family.isdigit() else None,
        "machine": platform.machine(),
        "cores": default_threads(),
        "clock_ghz": round(nominal_clock_hz() / 1e9, 3),
        "flags": interesting,
    }


@cache
def nominal_clock_hz() -> float:
    """The CPU's clock: $QUENCH_CPU_CLOCK_GHZ (e.g. a measured boost clock) if set, else
    cpufreq's cpuinfo_max_freq, else cpuinfo's MHz."""
    try:
        ghz = float(os.environ.get("QUENCH_CPU_CLOCK_GHZ", ""))
        if ghz > 0 and ghz != float("inf"):
            return ghz * 1e9
    except ValueError:
        pass
    try:
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        return float(khz) * 1e3
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) * 1e6
    except (OSError, ValueError, IndexError):
        pass
    return 2.5e9  # unknown: a typical server clock


def clock_source() -> str:
    """Where ``nominal_clock_hz`` got its figure (for the perf output)."""
    if os.environ.get("QUENCH_CPU_CLOCK_GHZ"):
        return "$QUENCH_CPU_CLOCK_GHZ"
    if Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").is_file():
        return "cpufreq cpuinfo_max_freq"
    return (
        "/proc/cpuinfo 'cpu MHz' (often the base clock in a VM; set QUENCH_CPU_CLOCK_GHZ "
        "to the real clock)"
    )
