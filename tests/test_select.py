"""--engine auto: interleaved timing rounds until the ranking is clear or the budget ends."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quench.backend.base import Compiled, CompileSpec
from quench.builder import select
from quench.builder.engines import Candidate, Prepared
from quench.cli import app


class FakeEngine:
    def __init__(self, name: str) -> None:
        self.name = name


def candidates(*names: str) -> list[tuple[FakeEngine, Compiled]]:
    return [(FakeEngine(n), Compiled({})) for n in names]


SPEC = CompileSpec("force_float32", "x", "y", None)


def fake_timer(speeds: list[float], noise: float):
    """Images/s of candidate i: speeds[i] times a deterministic wobble of +-noise."""
    wobble = itertools.cycle([1 + noise, 1 - noise, 1 + noise / 2, 1 - noise / 2, 1.0])
    return lambda i, b: speeds[i] * next(wobble)


def ticking(step: float):
    t = itertools.count()
    return lambda: next(t) * step


def timed_rank(names: list[str], speeds: list[float], noise: float, budget: float, logs: list[str]):
    """``select.rank`` on fake candidates: images/s ``speeds`` wobbling by ``noise``, a clock
    ticking 1 s per look."""
    return select.rank(
        candidates(*names),
        SPEC,
        (3, 8, 8),
        0.1,
        budget=budget,
        say=logs.append,
        timer=fake_timer(speeds, noise),
        clock=ticking(1.0),
    )


def test_a_clear_winner_stops_after_the_minimum_rounds() -> None:
    logs: list[str] = []
    order, timed, summary = timed_rank(
        ["onnxruntime", "openvino"], [100.0, 130.0], 0.01, 100.0, logs
    )
    assert order == [1, 0] and summary["decision"] == "clear"
    assert len(summary["rounds"]) == select.MIN_ROUNDS
    assert summary["margin"]["winner"] == "a" and summary["margin"]["margin"] > 0.2
    assert timed[1]["score"] > timed[0]["score"] and set(timed[0]["qps_by_batch"]) == {"1", "8"}
    assert "candidate 2 (openvino) vs next 1: 30." in logs[-1] and "[clear]" in logs[-1]


def test_a_tie_runs_to_the_budget_and_keeps_the_preferred_candidate() -> None:
    """Candidate 2 measures 1% faster inside +-10% noise: a tie, so the first is kept."""
    names = ["onnxruntime", "openvino", "openvino"]
    order, _, summary = timed_rank(names, [100.0, 101.0, 60.0], 0.10, 7.5, [])
    assert summary["decision"] == "tie" and order[0] == 0 and order[-1] == 2
    assert summary["stopped"] == "budget"
    # went on past the minimum, stopped by the budget (the fake clock ticks 1 s per look)
    assert 3 < len(summary["rounds"]) == 10 < select.MAX_ROUNDS
    assert summary["margin"]["winner"] == "tie" and select.TIE_RULE in summary["rule"]
    assert all(len(r) == 3 for r in summary["rounds"])


def test_equivalent_candidates_stop_before_the_budget() -> None:
    """Equal speeds inside +-2% noise: a tie, but known to within 3% after a few rounds; the
    rest of the budget would not change the choice."""
    logs: list[str] = []
    order, _, summary = timed_rank(["onnxruntime", "openvino"], [100.0, 100.0], 0.02, 100.0, logs)
    assert summary["decision"] == "tie" and summary["stopped"] == "equivalent"
    assert order[0] == 0 and len(summary["rounds"]) < 10
    assert "within 3%: stopped" in logs[-1] and select.STOP_RULE in summary["rule"]


def test_a_fixed_batch_is_timed_at_that_batch_only() -> None:
    seen: set[int] = set()

    def timer(i: int, b: int) -> float:
        seen.add(b)
        return 100.0 + 50 * i

    spec = CompileSpec("force_float32", "x", "y", 4)
    _, timed, _ = select.rank(
        candidates("a", "b"), spec, (3, 8, 8), 0.1, 1.0, lambda m: None, timer=timer
    )
    assert seen == {4} and set(timed[0]["qps_by_batch"]) == {"4"}


def test_build_records_every_round(tmp_path: Path, tiny_model: Path, tiny_labels: Path) -> None:
    from conftest import TINY_BUILD

    out = tmp_path / "auto.quench"
    res = CliRunner().invoke(
        app,
        [
            "build", str(tiny_model), "-o", str(out), "--labels", str(tiny_labels),
            "--preset", "imagenet", "--resize", "36", "--crop", str(TINY_BUILD["crop"]),
            "--engine", "auto", "--select-budget", "0.5",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "interleaved rounds" in res.stderr and "vs next" in res.stderr
    from quench.artifact import load

    sel = load(out).manifest["engine_selection"]
    assert sel["budget_seconds"] == 0.5 and len(sel["rounds"]) >= select.MIN_ROUNDS
    assert sel["decision"] in ("clear", "tie") and "confidence interval" in sel["rule"]
    assert CliRunner().invoke(app, ["build", str(tiny_model), "-o", str(out),
                                    "--select-budget", "-1"]).exit_code == 2  # fmt: skip


def test_choose_reorders_the_builders_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    cands = [
        Candidate(FakeEngine("a"), Compiled({}), {}, {}, Prepared(None)),
        Candidate(FakeEngine("b"), Compiled({}), {"streams": 2}, {}, Prepared(None)),
    ]

    class Opts:
        select_seconds, select_budget, progress = 0.1, 1.0, False

    real = select.rank
    monkeypatch.setattr(
        select, "rank", lambda *a, **k: real(*a, **k, timer=lambda i, b: 100.0 + 40 * i)
    )
    selection = select.choose(cands, SPEC, (3, 8, 8), Opts, lambda m: None)
    assert [c.engine.name for c in selection.ranked] == ["b", "a"]
    assert [r["engine"] for r in selection.records] == ["b", "a"]
    assert selection.records[0]["options"] == {"streams": 2}
    assert selection.records[0]["score"] == 140.0
    summary = selection.summary
    assert [r["score"] for r in summary["rounds"][0]] == [140.0, 100.0]
    assert summary["margin"]["over_candidate"] == 1
