"""Writing the report's files: ``report.json``, ``report.md``, ``report.html`` and the plots."""

from __future__ import annotations

import json
from pathlib import Path

from quench.report.document import ReportDoc
from quench.report.plots import make_plots, make_thumbnails
from quench.report.render import html_report, markdown


def write_json(doc: ReportDoc, path: Path) -> Path:
    path.write_text(json.dumps(doc.to_dict(), indent=2, default=str) + "\n")
    return path


def write(doc: ReportDoc, out: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_files = make_plots(doc, out / "plots") if plots else {}
    thumbs = make_thumbnails(doc, out / "plots" / "thumbs") if plots else {}
    doc.plots = {k: p.relative_to(out).as_posix() for k, p in plot_files.items()}
    files = {
        "json": out / "report.json",
        "md": out / "report.md",
        "html": out / "report.html",
    }
    write_json(doc, files["json"])
    files["md"].write_text(markdown(doc, plot_files, out, thumbs))
    files["html"].write_text(html_report(doc, plot_files, thumbs))
    return {**files, **{f"plot_{k}": p for k, p in plot_files.items()}}
