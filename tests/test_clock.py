"""The core clock share-of-peak uses: measured against a known loop, cached per boot,
overridden by $QUENCH_CPU_CLOCK_GHZ; no share above 100% is shown."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from quench import clock, perf


@pytest.fixture(autouse=True)
def _fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QUENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QUENCH_CPU_CLOCK_GHZ", raising=False)
    clock.core_clock.cache_clear()
    yield
    clock.core_clock.cache_clear()


def _runs_here() -> bool:
    try:
        clock.add_chain()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _runs_here(), reason="the add-chain loop is x86-64 only")
def test_measured_clock_predicts_a_known_loop() -> None:
    """A loop of 16 dependent adds per iteration takes 16 cycles an iteration: the measured
    clock predicts its time (best of a few runs, thread CPU time) within 10%."""
    hz = clock.measure().hz
    fn, n = clock.add_chain(16), 10_000_000
    best = min(_cpu_seconds(fn, n) for _ in range(5))
    assert hz * best == pytest.approx(16 * n, rel=0.10)


def _cpu_seconds(fn, n: int) -> float:
    t = time.thread_time()
    assert fn(n) == 16 * n
    return time.thread_time() - t


def test_override_wins_without_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUENCH_CPU_CLOCK_GHZ", "4.25")
    monkeypatch.setattr(clock, "measure", lambda: pytest.fail("measured despite the override"))
    c = clock.core_clock()
    assert c.hz == pytest.approx(4.25e9) and c.source == "QUENCH_CPU_CLOCK_GHZ"
    assert "4.250 GHz" in c.describe()


def test_cached_per_host_and_boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[int] = []

    def fake() -> clock.CoreClock:
        calls.append(1)
        return clock.CoreClock(3.5e9, "measured", "timed loop")

    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    monkeypatch.setattr(clock, "_BOOT_ID", boot)
    monkeypatch.setattr(clock, "measure", fake)
    assert clock.core_clock().hz == 3.5e9 and len(calls) == 1
    clock.core_clock.cache_clear()  # a new process, same boot: read from the cache
    again = clock.core_clock()
    assert again.hz == 3.5e9 and len(calls) == 1 and "cached" in again.how
    boot.write_text("boot-2\n")  # rebooted: measured again
    clock.core_clock.cache_clear()
    clock.core_clock()
    assert len(calls) == 2


def test_falls_back_to_the_reported_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> clock.CoreClock:
        raise OSError("no executable memory")

    monkeypatch.setattr(clock, "measure", refuse)
    c = clock.core_clock()
    assert c.source == "reported" and "not measured (no executable memory)" in c.how


def test_implausible_measurement_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clock, "cycles_per_second", lambda *a: 40e9)
    monkeypatch.setattr(clock, "add_chain", lambda adds: None)
    with pytest.raises(OSError, match="implausible"):
        clock.measure()


def test_no_share_above_peak_is_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(perf, "peak_macs", lambda compute, threads: (1.0, "tiny peak"))
    results = perf.sweep(
        lambda x: None,
        (3,),
        [1],
        perf.Timing(iterations=5, rounds=1, warmup=0),
        False,
        macs=10**9,
        compute="float32",
        threads=1,
        model="m",
        precision="p",
        engine="e",
    )
    r = results[0].to_dict()
    assert r["peak_share"] is None
    assert any("of the computed peak" in w for w in r["warnings"])
    assert perf.perf_row(r)[-1] == "-"
    assert np.isfinite(r["qps"])
