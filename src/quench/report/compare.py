"""The job's figures gathered into one document, and the builds compared with fp32: speedup
per batch size, top-1 change, and the verdict (the fastest build within the accuracy bound)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from quench import __version__
from quench.perf import PerfResult
from quench.precision import FORCE_FLOAT32
from quench.records import ClassifyRecord, EvalRecord, ModelSource, PerfRecord
from quench.report.document import (
    BatchVerdict,
    DocBuild,
    JobRecord,
    ReportDoc,
    Speedup,
    Stability,
    Verdict,
    Versus,
    machine,
)
from quench.stats import RULE, compare

FP32 = FORCE_FLOAT32.name
REFERENCE = FP32  # the "vs fp32" columns compare with this precision
MAX_TOP1_DROP = 1.0  # percentage points: the verdict's accuracy bound against fp32


def stability(perf: list[PerfResult]) -> Stability:
    """Whether the speed figures are trustworthy: every warning of every perf result."""
    warnings = list(dict.fromkeys(w for r in perf for w in r.warnings))
    loads = [r.machine_load for r in perf if r.machine_load]
    return Stability(
        unstable=bool(warnings),
        warnings=warnings,
        max_other_cores=max((x["other_cores"] for x in loads), default=None),
    )


def _builds(job: JobRecord) -> list[DocBuild]:
    """Byte-identical artifacts are shown once: the later ones point back."""
    out = []
    first_of: dict[str, str] = {}
    for p, b in job.builds.items():
        row = DocBuild(p, b)
        if b.sha256 and b.sha256 in first_of:
            row.same_as = first_of[b.sha256]
        elif b.sha256:
            first_of[b.sha256] = p
        out.append(row)
    return out


def collect(job: JobRecord) -> ReportDoc:
    """Every figure of the job, as one document."""
    done = [s for s in job.steps if s.done]
    perf = [r for s in done if isinstance(s.result, PerfRecord) for r in s.result.results]
    model = next((s.result for s in job.steps if isinstance(s.result, ModelSource)), None)
    doc = ReportDoc(
        quench_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine(),
        options=json.loads(json.dumps(job.options, default=str)),
        model=model,
        precisions=list(job.precisions),
        builds=_builds(job),
        accuracy=[s.result for s in done if isinstance(s.result, EvalRecord)],
        perf=perf,
        stability=stability(perf),
        classify={
            s.precision or "": s.result.predictions
            for s in done
            if isinstance(s.result, ClassifyRecord)
        },
        data=job.data,
        notes=list(job.notes),
        steps=list(job.steps),
    )
    doc.versus_fp32 = versus_fp32(doc)
    doc.verdict = verdict(doc)
    return doc


def _rounds(r: PerfResult) -> list[float]:
    return [x["qps"] for x in r.rounds] or [r.qps]


def _top1(doc: ReportDoc) -> dict[str, float]:
    return {a.precision: a.top1 for a in doc.accuracy}


def versus_fp32(doc: ReportDoc) -> list[Versus]:
    """Each build against fp32: speedup per batch size (a tie when inside the noise of the
    two runs' rounds) and top-1 change in percentage points."""
    perf = {(r.precision, r.batch): r for r in doc.perf}
    top1 = _top1(doc)
    rows = []
    for b in doc.builds:
        p = b.precision
        row = Versus(p, {}, b.same_as)
        for (prec, batch), r in sorted(perf.items(), key=lambda kv: kv[0][1]):
            base = perf.get((FP32, batch))
            if prec != p or base is None:
                continue
            c = compare(_rounds(r), _rounds(base))
            row.speedup[str(batch)] = Speedup(round(r.qps / base.qps, 3), c.winner != "tie")
        if p in top1 and FP32 in top1:
            row.top1_change_points = round((top1[p] - top1[FP32]) * 100, 2)
        rows.append(row)
    return rows


def verdict(doc: ReportDoc, max_drop: float = MAX_TOP1_DROP) -> Verdict:
    """The fastest build within ``max_drop`` top-1 points of fp32 at each batch size, never one
    slower than fp32 there. Builds whose speed differs by less than the noise are a tie, broken
    by accuracy (the higher top-1, else the higher fidelity agreement, else the earlier
    build)."""
    top1 = _top1(doc)
    order = [b.precision for b in doc.builds]
    agreement = {
        b.precision: (b.build.fidelity or {}).get("top1_agreement", 1.0) for b in doc.builds
    }
    measured = FP32 in top1

    def within(p: str) -> bool:
        if not measured:
            return True  # no accuracy figures: every build passed its fidelity gate
        if p not in top1:
            return False  # its accuracy was not measured (failed or skipped): not verified
        return (top1[FP32] - top1[p]) * 100 <= max_drop + 1e-9

    out = Verdict(max_drop, measured, f"{RULE}; a tie goes to the more accurate build")
    perf = [r for r in doc.perf if r.precision in order]
    for batch in sorted({r.batch for r in perf}):
        fp32 = next((r for r in doc.perf if r.precision == FP32 and r.batch == batch), None)
        # never a build slower than fp32: fp32 itself is the better choice then
        rs = [
            r
            for r in perf
            if r.batch == batch
            and within(r.precision)
            and (fp32 is None or r is fp32 or r.qps >= fp32.qps)
        ]
        if not rs:
            continue
        lead = max(rs, key=lambda r: r.qps)
        tied = [r for r in rs if compare(_rounds(lead), _rounds(r)).winner == "tie"]
        best = max(
            tied or [lead],
            key=lambda r: (
                top1.get(r.precision, 0.0),
                agreement[r.precision],
                -order.index(r.precision),
            ),
        )
        out.batches[str(batch)] = BatchVerdict(
            fastest=best.precision,
            qps=best.qps,
            speedup=round(best.qps / fp32.qps, 3) if fp32 else None,
            tied_with=[r.precision for r in tied if r is not best],
            top1_change_points=(
                round((top1[best.precision] - top1[FP32]) * 100, 2)
                if measured and best.precision in top1
                else None
            ),
            unstable=bool(best.warnings),
        )
    return out
