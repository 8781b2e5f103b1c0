"""The report's sections (:mod:`quench.report.sections`) as Markdown and as one
self-contained HTML page (plots and thumbnails embedded as base64)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from quench.report.blocks import (
    Banner,
    Block,
    Bullets,
    ImageTable,
    Para,
    Run,
    Section,
    Table,
)
from quench.report.document import ReportDoc
from quench.report.sections import Assets, sections

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:4px 8px;font-size:14px}
th{background:#f0f0f0}td.n{text-align:right}
.failed{color:#b00}.machine li{font-family:monospace}
.warning{background:#fff3cd;border:1px solid #e0b000;padding:6px 10px}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}img.thumb{margin:0}
"""


# -- Markdown -------------------------------------------------------------------------------------


def _md_table(cols: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    def cell(v: str) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _md_runs(runs: list[Run]) -> str:
    marks = {"": "", "b": "**", "code": "`"}
    return "".join(f"{marks[style]}{text}{marks[style]}" for text, style in runs)


def _md_block(b: Block, out: Path) -> str:
    if isinstance(b, Para):
        return _md_runs(b.runs)
    if isinstance(b, Bullets):
        return "\n".join(f"- {_md_runs(item)}" for item in b.items)
    if isinstance(b, Banner):
        return f"> **Warning:** {b.lead}\n>\n" + "\n".join(f"> - {w}" for w in b.items)
    if isinstance(b, Table):
        return _md_table(b.columns, b.rows) if b.rows else f"_{b.empty}_"
    if isinstance(b, ImageTable):
        rows = []
        for r in b.rows:
            pic = f"![]({r.thumb.relative_to(out).as_posix()})<br>" if r.thumb else ""
            rows.append([pic + r.label, *("<br>".join(c) for c in r.cells)])
        return _md_table(b.columns, rows)
    return "\n\n".join(f"![{k}]({p.relative_to(out).as_posix()})" for k, p in b.items)


def _md_section(s: Section, out: Path) -> str:
    head = f"{'#' * s.level} {s.title}\n\n" if s.title else ""
    return head + "\n\n".join(_md_block(b, out) for b in s.blocks) + "\n"


def markdown(
    doc: ReportDoc,
    plot_files: dict[str, Path],
    out: Path,
    thumbs: dict[str, Path] | None = None,
) -> str:
    """``report.md``: images linked relative to ``out``, the report folder."""
    assets = Assets(plot_files, thumbs or {})
    return "\n".join(_md_section(s, out) for s in sections(doc, assets))


# -- HTML -----------------------------------------------------------------------------------------


def _numeric(text: str) -> bool:
    try:
        float(str(text).rstrip("%"))
        return True
    except ValueError:
        return False


def _html_table(cols: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"n" if _numeric(c) else ""}">{e(str(c))}</td>' for c in r)
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_runs(runs: list[Run]) -> str:
    tags = {"": "", "b": "b", "code": "code"}
    out = []
    for text, style in runs:
        tag = tags[style]
        out.append(f"<{tag}>{html.escape(text)}</{tag}>" if tag else html.escape(text))
    return "".join(out)


def _embed(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _cls(name: str) -> str:
    return f" class='{name}'" if name else ""


def _image_table(b: ImageTable) -> list[str]:
    e = html.escape
    parts = [f"<table><thead><tr><th>{e(b.columns[0])}</th>"]
    parts += [f"<th>{e(c)}</th>" for c in b.columns[1:]]
    parts.append("</tr></thead><tbody>")
    for r in b.rows:
        pic = ""
        if r.thumb:
            src = _embed(r.thumb, "image/jpeg")
            pic = f'<img class="thumb" alt="{e(r.label)}" src="{src}"><br>'
        parts.append(f"<tr><td>{pic}{e(r.label)}</td>")
        parts += ["<td>" + "<br>".join(e(x) for x in c) + "</td>" for c in r.cells]
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return parts


def _html_block(b: Block) -> list[str]:
    """The block's lines of HTML."""
    e = html.escape
    if isinstance(b, Para):
        return [f"<p>{_html_runs(b.runs)}</p>"]
    if isinstance(b, Bullets):
        items = [f"<li{_cls(b.li_class)}>{_html_runs(item)}</li>" for item in b.items]
        ul = f"<ul{_cls(b.ul_class)}>"
        return [ul + "".join(items), "</ul>"] if b.one_line else [ul, *items, "</ul>"]
    if isinstance(b, Banner):
        items = [f"<li>{e(w)}</li>" for w in b.items]
        return [f"<div class='warning'><b>Warning:</b> {e(b.lead)}<ul>", *items, "</ul></div>"]
    if isinstance(b, Table):
        return [_html_table(b.columns, b.rows) if b.rows else f"<p><i>{e(b.empty)}</i></p>"]
    if isinstance(b, ImageTable):
        return _image_table(b)
    return [f'<div><img alt="{e(k)}" src="{_embed(p, "image/png")}"></div>' for k, p in b.items]


def _html_section(s: Section) -> list[str]:
    parts = [line for b in s.blocks for line in _html_block(b)]
    if s.title is None:
        return parts
    head = f"<h{s.level}{_cls(s.css_class)}>{html.escape(s.title)}</h{s.level}>"
    if s.blocks and isinstance(s.blocks[0], Bullets | ImageTable):  # opens on the heading's line
        return [head + parts[0], *parts[1:]]
    return [head, *parts]


def html_report(
    doc: ReportDoc, plot_files: dict[str, Path], thumbs: dict[str, Path] | None = None
) -> str:
    """``report.html``: one page, every image embedded."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>quench run report</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for s in sections(doc, Assets(plot_files, thumbs or {})):
        parts += _html_section(s)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
