"""What a report section is made of, independent of the markup: paragraphs, bullet lists, a
warning banner, tables and images. ``quench.report.render`` writes them as Markdown and HTML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# A piece of inline text and its style: "" plain, "b" bold, "code" code.
Run = tuple[str, str]


def plain(text: str) -> list[Run]:
    return [(text, "")]


def marked(line: str) -> list[Run]:
    """A line with Markdown's **bold** in it, as runs."""
    return [(part, "b" if i % 2 else "") for i, part in enumerate(line.split("**")) if part]


@dataclass
class Para:
    runs: list[Run]


@dataclass
class Bullets:
    items: list[list[Run]]
    ul_class: str = ""
    li_class: str = ""
    one_line: bool = False  # HTML: the items on the list's first line


@dataclass
class Banner:
    """A warning: its first line, then the reasons."""

    lead: str
    items: list[str]


@dataclass
class Table:
    columns: tuple[str, ...] | list[str]
    rows: list[list[str]]
    empty: str = "none"  # shown instead of a table without rows


@dataclass
class ImageRow:
    label: str
    thumb: Path | None  # a JPEG thumbnail
    cells: list[list[str]]  # each cell's lines


@dataclass
class ImageTable:
    """A table whose first column is a picture and its label, the others lines of text."""

    columns: list[str]
    rows: list[ImageRow]


@dataclass
class Images:
    items: list[tuple[str, Path]]  # name, PNG file


Block = Para | Bullets | Banner | Table | ImageTable | Images


@dataclass
class Section:
    title: str | None  # None: blocks under the previous heading
    blocks: list[Block] = field(default_factory=list)
    level: int = 2
    css_class: str = ""
