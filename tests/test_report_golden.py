"""The report's Markdown and HTML, byte for byte, for two fixed documents (captured from the
renderers before they walked one list of sections: tests/golden/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quench import report

GOLDEN = Path(__file__).parent / "golden"


def _files(out: Path, doc: dict) -> tuple[dict[str, Path], dict[str, Path]]:
    """Plot and thumbnail files with fixed bytes (the HTML embeds them)."""
    (out / "plots" / "thumbs").mkdir(parents=True)
    plots = {k: out / v for k, v in doc.get("plots", {}).items()}
    for k, p in plots.items():
        p.write_bytes(b"PNG " + k.encode())
    thumbs = {}
    if plots:
        thumbs["/data/img/cat.jpg"] = out / "plots" / "thumbs" / "0.jpg"
        thumbs["/data/img/cat.jpg"].write_bytes(b"JPEG cat")
    return plots, thumbs


@pytest.mark.parametrize("name", ["report", "bare"])
def test_rendering_is_unchanged(name: str, tmp_path: Path) -> None:
    doc = json.loads((GOLDEN / f"{name}_doc.json").read_text())
    out = tmp_path / "out"
    plots, thumbs = _files(out, doc)
    assert report.markdown(doc, plots, out, thumbs) == (GOLDEN / f"{name}.md").read_text()
    assert report.html_report(doc, plots, thumbs) == (GOLDEN / f"{name}.html").read_text()
