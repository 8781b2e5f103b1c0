"""``--engine auto``: choose among compiled candidates by timing them in interleaved rounds.

Every round times each candidate at each batch size it will serve, in a rotating order, so a
slow spell of the machine hits all of them alike; a candidate's round score is the geometric
mean of its images/s over the batch sizes. Rounds go on until the leader beats every other
candidate beyond the noise (``quench.stats.compare``, paired by round), or each one it does not
beat is known to be within ``EQUIVALENT`` of it (more rounds could not matter), or the time
budget ends.
When the leader is not clearly faster, the tie goes to the candidate first in preference order
(the order the builder lists them: engine preference, default options, float first layer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np

from quench.backend.base import Compiled, CompileSpec, Engine
from quench.builder.engines import Candidate, Selection
from quench.perf import measure, random_batch
from quench.progress import Bar
from quench.stats import MIN_ROUNDS, RULE, compare, geomean, spread

MAX_ROUNDS = 50
EQUIVALENT = 0.03  # a ratio known (95% CI) to lie within +-3% of 1: no point timing on
TIE_RULE = "tie: kept the candidate first in preference order"
STOP_RULE = (
    f"rounds stop once every other candidate is clearly slower or known to be within "
    f"{EQUIVALENT:.0%} of the leader (its ratio's 95% confidence interval), else at the budget"
)

Log = Callable[[str], None]
Timer = Callable[[Any, int], float]  # (runner or index, batch) -> images/s of one timing


def choose(
    candidates: list[Candidate], spec: CompileSpec, shape: tuple[int, ...], opts: Any, say: Log
) -> Selection:
    """The builder's candidates in the order to try them, each with its timing record, and the
    selection summary for the manifest (its rounds listed in that same order). ``shape``: the
    compiled models' input (per image), of ``spec.input_dtype``. ``opts``: the
    ``BuildOptions`` (``select_seconds``, ``select_budget``, ``progress``)."""
    say(f"timing {len(candidates)} candidates in interleaved rounds")
    for i, c in enumerate(candidates):
        say(f"  candidate {i + 1}: {c.describe()}")
    order, timed, summary = rank(
        [(c.engine, c.compiled) for c in candidates],
        spec,
        shape,
        opts.select_seconds,
        opts.select_budget,
        say,
        progress=opts.progress,
    )
    records = [
        {**c.record(), "options": c.variant, **t} for c, t in zip(candidates, timed, strict=True)
    ]
    summary["rounds"] = [[row[i] for i in order] for row in summary["rounds"]]
    summary["margin"]["over_candidate"] = order.index(summary["margin"]["over_candidate"])
    return Selection([candidates[i] for i in order], [records[i] for i in order], summary)


def rank(
    candidates: Sequence[tuple[Engine, Compiled]],
    spec: CompileSpec,
    shape: tuple[int, ...],
    round_seconds: float,
    budget: float,
    say: Log,
    progress: bool = False,
    timer: Timer | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[int], list[dict[str, Any]], dict[str, Any]]:
    """Time ``candidates`` in interleaved rounds; returns the order to try them in (winner
    first, then by median score), each one's timing record, and the selection summary for the
    manifest (every round, the decision, the winner's margin and the rule). ``timer`` and
    ``clock`` replace the real measurement in tests."""
    batches = [spec.batch] if spec.batch else [1, 8]
    inputs = {b: random_batch(shape, b, spec.input_dtype) for b in batches}

    def real_timer(run: Any, b: int) -> float:
        n, secs, _ = measure(
            lambda x: run.infer({spec.input_name: x}),
            shape,
            b,
            duration=round_seconds,
            warmup=1,
            x=inputs[b],
        )
        return b * n / secs

    time_one = timer or real_timer
    rounds: list[list[dict[str, Any]]] = []
    with ExitStack() as stack:
        runners: list[Any] = [
            stack.enter_context(engine.runner(c.payloads, c.options, threads=spec.threads))
            if timer is None
            else i  # a test's timer gets the candidate's index
            for i, (engine, c) in enumerate(candidates)
        ]
        if timer is None:
            for run in runners:  # warm up every candidate before the first round
                for b in batches:
                    measure(
                        lambda x, run=run: run.infer({spec.input_name: x}),
                        shape,
                        b,
                        iterations=1,
                        warmup=2,
                        x=inputs[b],
                    )
        start = clock()
        decision, stop = "budget", "budget"
        with Bar("choosing the engine (rounds)", None, enabled=progress) as bar:
            while True:
                k = len(rounds)
                row: list[dict[str, Any]] = [{} for _ in candidates]
                for j in range(len(candidates)):
                    i = (j + k) % len(candidates)  # rotate who goes first
                    qps = {str(b): round(time_one(runners[i], b), 2) for b in batches}
                    row[i] = {"qps_by_batch": qps, "score": round(geomean(list(qps.values())), 2)}
                rounds.append(row)
                bar.advance()
                if len(rounds) >= MIN_ROUNDS:
                    leader, vs = _leader(rounds)
                    if all(c.winner == "a" for c in vs.values()):
                        decision = stop = "clear"
                        break
                    if all(c.winner == "a" or _equivalent(c) for c in vs.values()):
                        stop = "equivalent"
                        break
                    if clock() - start >= budget or len(rounds) >= MAX_ROUNDS:
                        break
    scores = [[r[i]["score"] for r in rounds] for i in range(len(candidates))]
    medians = [float(np.median(s)) for s in scores]
    leader, vs = _leader(rounds)
    winner = leader
    if decision != "clear":
        # not beaten beyond the noise (a "b" against the best median is mixed evidence: a tie)
        tied = [leader] + [i for i, c in vs.items() if c.winner != "a"]
        winner = min(tied)  # preference order
        decision = "tie" if len(tied) > 1 else "clear"
    rest = sorted((i for i in range(len(candidates)) if i != winner), key=lambda i: -medians[i])
    order = [winner, *rest]
    runner_up = rest[0]
    margin = compare(scores[winner], scores[runner_up], paired=True)
    timed = [
        {
            "engine": candidates[i][0].name,
            "qps_by_batch": {
                str(b): round(float(np.median([r[i]["qps_by_batch"][str(b)] for r in rounds])), 2)
                for b in batches
            },
            "score": round(medians[i], 2),
            "score_spread": spread(scores[i]).to_dict(),
        }
        for i in range(len(candidates))
    ]
    summary = {
        "rounds": rounds,
        "round_seconds": round_seconds,
        "budget_seconds": budget,
        "seconds": round(clock() - start, 3),
        "decision": decision,
        "stopped": stop,
        "margin": {"over_candidate": runner_up, **margin.to_dict()},
        "rule": RULE + "; " + STOP_RULE + ("; " + TIE_RULE if decision == "tie" else ""),
    }
    how = "clear" if decision == "clear" else TIE_RULE
    if stop == "equivalent":
        how += f"; the others within {EQUIVALENT:.0%}: stopped"
    say(
        f"  {len(rounds)} rounds in {summary['seconds']:.1f} s: candidate {winner + 1} "
        f"({candidates[winner][0].name}) vs next {runner_up + 1}: {margin.text()} [{how}]"
    )
    return order, timed, summary


def _equivalent(c: Any) -> bool:
    """The ratio's confidence interval lies within ``EQUIVALENT`` of 1 (either way)."""
    return c.low >= 1 / (1 + EQUIVALENT) and c.high <= 1 + EQUIVALENT


def _leader(rounds: list[list[dict[str, Any]]]) -> tuple[int, dict[int, Any]]:
    """The candidate with the best median score and its comparison with each other one."""
    n = len(rounds[0])
    scores = [[r[i]["score"] for r in rounds] for i in range(n)]
    leader = max(range(n), key=lambda i: (np.median(scores[i]), -i))
    return leader, {
        i: compare(scores[leader], scores[i], paired=True) for i in range(n) if i != leader
    }
