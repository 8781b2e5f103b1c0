"""The CPU's peak MACs/s, from its ISA flags, core count and measured core clock
(``quench.clock``): the denominator of share of peak."""

from __future__ import annotations

from typing import Any

from quench.hw import clock_hz, clock_source, cpu_info, default_threads
from quench.manifest import PrecisionInfo

# MACs per cycle per core, by what the CPU can do (see README "Share of peak").
_FP32_MACS = {"avx512_full": 32, "avx512_half": 16, "avx2": 16, "sse": 4}


def fp32_macs_per_cycle(info: dict[str, Any]) -> tuple[int, str]:
    """fp32 FMA lanes x FMA pipes per cycle per core, from the CPU family and flags."""
    flags = set(info.get("flags", []))
    vendor_family = (info.get("vendor"), info.get("family"))
    if "avx512f" in flags:
        # AMD Zen 4 (family 25) executes 512-bit FMAs on 256-bit pipes; Zen 5 (26) and Intel
        # server cores with two FMA units do two full 512-bit FMAs per cycle.
        if vendor_family == ("AuthenticAMD", 25):
            return _FP32_MACS["avx512_half"], "AVX-512 on 2x256-bit FMA pipes (Zen 4)"
        return _FP32_MACS["avx512_full"], "AVX-512, 2 FMA pipes x 16 fp32 lanes"
    if "avx2" in flags and "fma" in flags:
        return _FP32_MACS["avx2"], "AVX2, 2 FMA pipes x 8 fp32 lanes"
    return _FP32_MACS["sse"], "SSE"


def peak_macs(compute: str, threads: int | None = None) -> tuple[float, str]:
    """Peak MACs/s of this CPU for a compute precision, and how it was worked out."""
    info = cpu_info()
    flags = set(info.get("flags", []))
    base, how = fp32_macs_per_cycle(info)
    factor, why = 1, "fp32 FMA"
    if compute == "bfloat16" and "amx_bf16" in flags:
        factor, why = 32, "AMX-BF16"
    elif compute == "bfloat16" and "avx512_bf16" in flags:
        factor, why = 2, "VDPBF16PS: 2 bf16 MACs per fp32 lane"
    elif compute == "float16" and "avx512_fp16" in flags:
        factor, why = 2, "AVX512-FP16: 32 fp16 lanes"
    elif compute == "int8" and "amx_int8" in flags:
        factor, why = 64, "AMX-INT8"
    elif compute == "int8" and flags & {"avx512_vnni", "avx_vnni"}:
        factor, why = 4, "VNNI VPDPBUSD: 4 u8xs8 MACs per 32-bit lane"
    elif compute == "int8":
        factor, why = 2, "PMADDUBSW: 2 MACs per 16-bit lane"
    cores = threads or default_threads()
    hz = clock_hz()
    macs = cores * hz * base * factor
    return macs, (f"{cores} cores x {hz / 1e9:.2f} GHz x {base * factor} MACs/cycle ({how}; {why})")


def over_peak(batch: int, share: float) -> str:
    """The warning for a rate above the computed peak (its share is not shown)."""
    return (
        f"batch {batch}: {share:.0%} of the computed peak, so the peak is wrong for this CPU "
        f"(clock {clock_source()}); share of peak not shown (set QUENCH_CPU_CLOCK_GHZ)"
    )


def compute_of(manifest: dict[str, Any]) -> str:
    """The arithmetic that dominates an artifact: int8, bfloat16, float16 or float32."""
    return PrecisionInfo.from_dict(manifest["precision"]).compute
