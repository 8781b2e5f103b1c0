"""What this machine is: CPU model, flags, cores."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import psutil
from threadpoolctl import threadpool_limits

from quench.clock import core_clock
from quench.cpuinfo import cpuinfo_fields, reported_clock_hz  # noqa: F401  (re-exported)
from quench.errors import QuenchError


def one_blas_thread() -> threadpool_limits:
    """NumPy's BLAS on one thread: inside ``with one_blas_thread():`` (restored on leaving), or
    for the rest of the process when not used as a context manager (the CLI does that).

    Quench's heavy arithmetic runs in ONNX Runtime and OpenVINO; a threaded OpenBLAS call was
    seen to spin forever (100% CPU) when another thread forked meanwhile (OpenVINO's model
    conversion forks to send telemetry), so Quench's own NumPy-heavy steps run under this.
    """
    import numpy  # noqa: F401 - loads OpenBLAS, so that the limit reaches it

    return threadpool_limits(limits=1, user_api="blas")


def default_threads() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_info() -> dict[str, object]:
    """CPU model name, ISA flags, core count (from /proc/cpuinfo where available) and the core
    clock (``quench.clock``, read at each call: it is not part of the cached facts)."""
    facts = dict(_cpu_facts())
    flags = facts.pop("flags")
    clock = core_clock()
    return {
        **facts,
        "clock_ghz": round(clock.hz / 1e9, 3),
        "clock": clock.to_dict(),
        "flags": flags,
    }


@cache
def _cpu_facts() -> dict[str, object]:
    fields = cpuinfo_fields()
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name", platform.processor() or platform.machine())
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
        "flags": interesting,
    }


def clock_hz() -> float:
    """The core clock share-of-peak figures use (``quench.clock.core_clock``: measured,
    cached per host and boot, unless ``$QUENCH_CPU_CLOCK_GHZ`` is set)."""
    return core_clock().hz


def clock_source() -> str:
    """The clock used and how it was found (for the perf output)."""
    return core_clock().describe()


# oneDNN's ISA names in order (``ONEDNN_MAX_CPU_ISA`` caps OpenVINO's kernels at one of them)
_ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
)
_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512", "AVX512_CORE_AMX": "AVX10_1_512_AMX"}
_ALIASES["AVX512_CORE_AMX_FP16"] = "AVX10_1_512_AMX_FP16"


def onednn_isa_cap() -> str | None:
    """``$ONEDNN_MAX_CPU_ISA`` as oneDNN reads it (upper case), or None when unset/``ALL``."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return value if value and value not in ("ALL", "DEFAULT") else None


def _isa_rank(name: str) -> int:
    name = _ALIASES.get(name, name)
    order = [n for n in _ONEDNN_ISAS if n not in _ALIASES]
    return order.index(name) if name in order else len(order)


def int8_class(capped: bool = True) -> str:
    """The CPU's int8 arithmetic class: ``amx``, ``vnni`` (int32 accumulation), ``avx512`` or
    ``avx2`` (u8 x s8 pairs summed into int16 with saturation), ``arm`` or ``other``.

    ``capped``: as OpenVINO's kernels see it, i.e. lowered by ``$ONEDNN_MAX_CPU_ISA``.
    """
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm"
    flags = set(cpu_info()["flags"])  # type: ignore[arg-type]
    if "amx_int8" in flags:
        found = "amx"
    elif flags & {"avx512_vnni", "avx_vnni"}:
        found = "vnni"
    elif "avx512f" in flags:
        found = "avx512"
    elif "avx2" in flags:
        found = "avx2"
    else:
        return "other"
    cap = onednn_isa_cap() if capped else None
    if cap is None:
        return found
    rank = _isa_rank(cap)
    ceiling = (
        "amx"
        if rank >= _isa_rank("AVX10_1_512_AMX")
        else "vnni"
        if rank >= _isa_rank("AVX512_CORE_VNNI") or cap.startswith("AVX2_VNNI")
        else "avx512"
        if rank >= _isa_rank("AVX512_CORE")
        else "avx2"
        if rank >= _isa_rank("AVX2")
        else "other"
    )
    order = ("other", "avx2", "avx512", "vnni", "amx")
    return min(found, ceiling, key=order.index)


def int8_accumulates_in_int32(capped: bool = True) -> bool:
    """Whether full-range (8-bit) int8 weights are exact here: VNNI, AMX or ARM."""
    return int8_class(capped) in ("amx", "vnni", "arm")


def half_precision_capped() -> set[str]:
    """Half-precision arithmetic that ``$ONEDNN_MAX_CPU_ISA`` takes away from OpenVINO
    (``BF16``, ``FP16``): OpenVINO still lists them, but its kernels then cannot run them."""
    cap = onednn_isa_cap()
    if cap is None:
        return set()
    rank, lost = _isa_rank(cap), set()
    if rank < _isa_rank("AVX512_CORE_BF16"):
        lost.add("BF16")
    if rank < _isa_rank("AVX10_1_512"):
        lost.add("FP16")
    return lost


def host_fingerprint() -> dict[str, object]:
    """What decides an artifact's numerics on this host: CPU architecture and ISA flags, and
    the ISA cap OpenVINO's kernels obey (engine versions are added by the caller)."""
    info = cpu_info()
    return {
        "machine": info["machine"],
        "flags": list(info["flags"]),  # type: ignore[call-overload]
        "onednn_max_cpu_isa": onednn_isa_cap(),
    }


def parse_cpus(text: str) -> list[int]:
    """``0,2-3`` -> [0, 2, 3]: a CPU list as ``taskset -c`` takes it."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise QuenchError(f"--pin: expected CPU numbers like 0,1 or 0-3, got {text!r}") from None
    allowed = set(range(psutil.cpu_count() or 1))
    if not cpus or not cpus <= allowed:
        raise QuenchError(
            f"--pin {text}: this machine has CPUs 0-{max(allowed)}; got {sorted(cpus)}"
        )
    return sorted(cpus)


@contextmanager
def pinned(cpus: list[int] | None) -> Iterator[None]:
    """Run the block with this process (and the engine threads it starts) on ``cpus`` only;
    the previous affinity is restored afterwards. None: no change."""
    if cpus is None:
        yield
        return
    proc = psutil.Process()
    if not hasattr(proc, "cpu_affinity"):
        raise QuenchError("--pin: this operating system does not let a process set its CPUs")
    before = proc.cpu_affinity()
    proc.cpu_affinity(cpus)
    try:
        yield
    finally:
        proc.cpu_affinity(before)
