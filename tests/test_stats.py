"""quench.stats: spread over rounds, machine load, and differences beyond the noise."""

from __future__ import annotations

import pytest

from quench import stats


def test_spread_figures() -> None:
    s = stats.spread([100.0, 110.0, 90.0, 100.0])
    assert (s.n, s.min, s.median, s.mean, s.max) == (4, 90.0, 100.0, 100.0, 110.0)
    assert s.cv == pytest.approx(8.165 / 100, rel=1e-3)  # sample std / mean
    assert s.unstable  # above the 5% bound
    assert stats.spread([5.0]).cv == 0.0 and not stats.spread([100, 101, 99]).unstable
    assert "varied 8.2% between rounds" in stats.instability("batch 1 throughput", s)
    assert stats.instability("x", stats.spread([100, 101])) is None
    with pytest.raises(ValueError):
        stats.spread([])


def test_split_rounds() -> None:
    assert stats.split(7, 3) == [3, 2, 2]
    assert stats.split(2, 5) == [1, 1]  # never an empty round
    assert sum(stats.split(1000, 7)) == 1000


def test_compare_calls_a_difference_only_beyond_the_noise() -> None:
    fast = [110.0, 111.0, 109.0, 110.5, 110.2]
    slow = [100.0, 101.0, 99.0, 100.5, 100.1]
    c = stats.compare(fast, slow)
    assert c.winner == "a" and c.low > 1 and c.margin == pytest.approx(0.10, abs=0.01)
    assert stats.compare(slow, fast).winner == "b"
    # a 3% difference inside +-10% noise is a tie
    noisy_a = [103.0, 93.0, 113.0, 98.0, 108.0]
    noisy_b = [100.0, 110.0, 90.0, 105.0, 95.0]
    tie = stats.compare(noisy_a, noisy_b)
    assert tie.winner == "tie" and tie.margin == 0 and tie.low < 1 < tie.high
    assert tie.text().startswith("tie: ") and tie.to_dict()["rule"] == stats.RULE
    # too few rounds cannot call anything
    assert stats.compare([200.0, 201.0], [100.0, 100.0]).winner == "tie"


def test_paired_rounds_cancel_a_drifting_machine() -> None:
    """The machine slows down over the run; a is 5% faster in every round. Unpaired, the drift
    swamps it; paired round by round, it is clear."""
    drift = [100.0, 80.0, 60.0, 90.0, 70.0, 100.0]
    a = [d * 1.05 for d in drift]
    b = [d * (1 + 0.002 * (i % 2)) for i, d in enumerate(drift)]
    assert stats.compare(a, b).winner == "tie"
    paired = stats.compare(a, b, paired=True)
    assert paired.winner == "a" and paired.paired
    assert paired.margin == pytest.approx(0.049, abs=0.002)


def test_watch_load_counts_other_programs_cpu_time() -> None:
    # every program used 3 s of CPU over 2 s; this process used 1.5 s: others kept 0.75 cores
    samples = iter([(10.0, 1.0), (13.0, 2.5)])
    clock = iter([0.0, 2.0])
    with stats.watch_load(lambda: next(samples), lambda: next(clock), lambda: 0.4, cores=2) as ml:
        pass
    assert ml.other_cores == pytest.approx(0.75) and ml.busy
    assert "0.75 of 2 cores" in ml.warnings[0]
    assert ml.to_dict()["busy"] is True and ml.load_before == 0.4

    samples = iter([(10.0, 1.0), (12.1, 3.0)])  # others 0.05 cores: quiet
    clock = iter([0.0, 2.0])
    with stats.watch_load(lambda: next(samples), lambda: next(clock), lambda: 0.1, cores=2) as ml:
        pass
    assert not ml.busy and not ml.warnings

    samples = iter([(0.0, 0.0), (0.0, 0.0)])  # quiet meanwhile, but a loaded machine before
    clock = iter([0.0, 1.0])
    with stats.watch_load(lambda: next(samples), lambda: next(clock), lambda: 3.5, cores=2) as ml:
        pass
    assert ml.busy and "load average was 3.50 on 2 cores" in ml.warnings[0]


def test_watch_load_on_this_machine() -> None:
    with stats.watch_load() as ml:
        sum(range(10000))
    assert ml.cores >= 1 and ml.seconds >= 0 and ml.other_cores >= 0
