"""The CPU facts the system reports: /proc/cpuinfo's fields and the reported clock (stdlib
only, read by :mod:`quench.clock` and :mod:`quench.hw`)."""

from __future__ import annotations

from pathlib import Path

_CPUINFO = Path("/proc/cpuinfo")
_CPUFREQ_MAX = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")


def cpuinfo_fields() -> dict[str, str]:
    """The first CPU's fields of /proc/cpuinfo (``model name``, ``flags``, ``cpu MHz``...);
    empty where there is none."""
    fields: dict[str, str] = {}
    try:
        for line in _CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key and key not in fields:
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


def reported_clock_hz() -> tuple[float | None, str]:
    """The clock the system reports (often the base clock, not the one the cores run at),
    and where from: cpufreq's cpuinfo_max_freq, else cpuinfo's MHz; (None, "unknown")."""
    try:
        return float(_CPUFREQ_MAX.read_text()) * 1e3, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        return float(cpuinfo_fields()["cpu MHz"]) * 1e6, "/proc/cpuinfo 'cpu MHz'"
    except (KeyError, ValueError):
        pass
    return None, "unknown"
