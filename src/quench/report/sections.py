"""The report's sections, in order: one function each, from the typed document to blocks
(``None``: the section is left out). Markdown and HTML both render this one list."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from quench.report import tables as t
from quench.report.blocks import (
    Banner,
    Bullets,
    ImageRow,
    Images,
    ImageTable,
    Para,
    Section,
    Table,
    marked,
    plain,
)
from quench.report.document import ReportDoc


@dataclass
class Assets:
    """The files the report shows: plots (name -> PNG) and thumbnails (image -> JPEG)."""

    plots: dict[str, Path] = field(default_factory=dict)
    thumbs: dict[str, Path] = field(default_factory=dict)


def title(doc: ReportDoc, assets: Assets) -> Section:
    return Section(
        "quench run report", [Para(plain(f"{doc.created}, quench {doc.quench_version}"))], 1
    )


def verdict(doc: ReportDoc, assets: Assets) -> Section:
    return Section("Verdict", [Bullets([marked(line) for line in t.verdict_lines(doc)])])


def machine(doc: ReportDoc, assets: Assets) -> Section:
    lines = [plain(line) for line in t.machine_lines(doc)]
    return Section("Machine", [Bullets(lines, ul_class="machine")])


def model(doc: ReportDoc, assets: Assets) -> Section | None:
    if doc.model is None:
        return None
    runs = [("Model: ", ""), (doc.model.path, "code"), (" (sha256 ", "")]
    return Section(None, [Para([*runs, (doc.model.sha256, "code"), (")", "")])])


def warning(doc: ReportDoc, assets: Assets) -> Section | None:
    lines = t.unstable_lines(doc)
    return Section(None, [Banner(lines[0], lines[1:])]) if lines else None


def failed(doc: ReportDoc, assets: Assets) -> Section | None:
    if not doc.failed:
        return None
    items = [[(f["step"], "b"), (f": {f['error']}", "")] for f in doc.failed]
    return Section("Failed steps", [Bullets(items, li_class="failed")], css_class="failed")


def _table(title: str, table: Table, line: str | None = "") -> Section:
    return Section(title, [table, *([Para(plain(line))] if line else [])])


def against_fp32(doc: ReportDoc, assets: Assets) -> Section:
    return _table("Against fp32", Table(t.VERSUS_COLUMNS, t.versus_rows(doc)))


def performance(doc: ReportDoc, assets: Assets) -> Section:
    line = t.SYNTHETIC_LINE if t.synthetic_calibration(doc) else ""
    return _table("Performance", Table(t.REPORT_PERF_COLUMNS, t.perf_rows(doc)), line)


def accuracy(doc: ReportDoc, assets: Assets) -> Section:
    line = doc.data.accuracy_note if doc.data else ""
    return _table("Accuracy", Table(t.ACC_COLUMNS, t.acc_rows(doc)), line)


def builds(doc: ReportDoc, assets: Assets) -> Section:
    return _table("Builds", Table(t.BUILD_COLUMNS, t.build_rows(doc)))


def steps(doc: ReportDoc, assets: Assets) -> Section:
    return _table("Steps", Table(t.STEP_COLUMNS, t.step_rows(doc)))


def samples(doc: ReportDoc, assets: Assets) -> Section | None:
    precs, rows = t.sample_rows(doc)
    if not rows:
        return None
    images = [ImageRow(Path(f).name, assets.thumbs.get(f), cells) for f, cells in rows]
    return Section("Sample top-5", [ImageTable(["image", *precs], images)])


def notes(doc: ReportDoc, assets: Assets) -> Section | None:
    if not doc.notes:
        return None
    return Section("Notes", [Bullets([plain(n) for n in doc.notes], one_line=True)])


def plots(doc: ReportDoc, assets: Assets) -> Section | None:
    return Section("Plots", [Images(list(assets.plots.items()))]) if assets.plots else None


SECTIONS: tuple[Callable[[ReportDoc, Assets], Section | None], ...] = (
    title,
    verdict,
    machine,
    model,
    warning,
    failed,
    against_fp32,
    performance,
    accuracy,
    builds,
    steps,
    samples,
    notes,
    plots,
)


def sections(doc: ReportDoc, assets: Assets) -> list[Section]:
    """Every section of the report that has something to show, in order."""
    return [s for make in SECTIONS if (s := make(doc, assets)) is not None]
