"""The report's Markdown and HTML, byte for byte, for two fixed documents (captured from the
renderers before they walked one list of sections: tests/golden/), and ``report.json`` as the
document's ``to_dict``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quench import report
from quench.records import BuildRecord, Step
from quench.report import DataSources, JobRecord, ReportDoc

GOLDEN = Path(__file__).parent / "golden"


def _files(out: Path, doc: ReportDoc) -> tuple[dict[str, Path], dict[str, Path]]:
    """Plot and thumbnail files with fixed bytes (the HTML embeds them)."""
    (out / "plots" / "thumbs").mkdir(parents=True)
    plots = {k: out / v for k, v in (doc.plots or {}).items()}
    for k, p in plots.items():
        p.write_bytes(b"PNG " + k.encode())
    thumbs = {}
    if plots:
        thumbs["/data/img/cat.jpg"] = out / "plots" / "thumbs" / "0.jpg"
        thumbs["/data/img/cat.jpg"].write_bytes(b"JPEG cat")
    return plots, thumbs


@pytest.mark.parametrize("name", ["report", "bare"])
def test_rendering_is_unchanged(name: str, tmp_path: Path) -> None:
    stored = json.loads((GOLDEN / f"{name}_doc.json").read_text())
    doc = ReportDoc.from_dict(stored)
    assert doc.to_dict() == stored  # report.json reads back to the same document
    out = tmp_path / "out"
    plots, thumbs = _files(out, doc)
    assert report.markdown(doc, plots, out, thumbs) == (GOLDEN / f"{name}.md").read_text()
    assert report.html_report(doc, plots, thumbs) == (GOLDEN / f"{name}.html").read_text()


def test_collect_gives_the_same_document() -> None:
    """The job record the golden document was collected from gives it again (the figures;
    the machine and the time are this run's)."""
    job = json.loads((GOLDEN / "report_job.json").read_text())
    record = JobRecord(
        options=job["options"],
        steps=[Step.from_dict(s) for s in job["steps"]],
        notes=job["notes"],
        builds={p: BuildRecord.from_dict(b) for p, b in job["builds"].items()},
        precisions=job["precisions"],
        data=DataSources(**job["data"]),
    )
    got = report.collect(record).to_dict()
    want = json.loads((GOLDEN / "report_doc.json").read_text())
    for key in ("created", "machine", "quench_version", "total_seconds", "plots"):
        got.pop(key, None)
        want.pop(key)
    assert json.loads(json.dumps(got)) == want
