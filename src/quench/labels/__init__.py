"""Label sets (class index -> human name) shipped with Quench."""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources
from pathlib import Path

from quench.errors import QuenchError

BUILTIN = {"imagenet-1k": "imagenet-1k.tsv"}


@cache
def _read_builtin(name: str) -> tuple[str, ...]:
    text = resources.files(__package__).joinpath(BUILTIN[name]).read_text(encoding="utf-8")
    return tuple(_parse(text.splitlines(), name))


def _parse(lines: list[str], source: str) -> list[str]:
    """Parse ``index<TAB>wnid<TAB>name`` (with header), ``index<TAB>name`` or one name per line."""
    rows = [r for r in csv.reader(lines, delimiter="\t") if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() == "index":
        rows = rows[1:]
    if not rows:
        raise QuenchError(f"{source}: label file has no labels")
    if all(len(r) >= 2 and r[0].strip().isdigit() for r in rows):
        by_index = {int(r[0]): r[-1].strip() for r in rows}
        if sorted(by_index) != list(range(len(by_index))):
            raise QuenchError(f"{source}: label indices are not 0..{len(by_index) - 1}")
        return [by_index[i] for i in range(len(by_index))]
    return [r[0].strip() for r in rows]


def load_labels(spec: str | Path) -> list[str]:
    """Return class names for a built-in label set name or a label file path."""
    if str(spec) in BUILTIN:
        return list(_read_builtin(str(spec)))
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuenchError(f"{path}: cannot read label file ({exc.strerror or exc})") from exc
    return _parse(text.splitlines(), str(path))


@cache
def imagenet_wnids() -> tuple[str, ...]:
    """The WordNet ids of the ImageNet-1k classes, by class index."""
    text = resources.files(__package__).joinpath(BUILTIN["imagenet-1k"]).read_text("utf-8")
    rows = [r for r in csv.reader(text.splitlines(), delimiter="\t") if r][1:]
    return tuple(r[1].strip() for r in sorted(rows, key=lambda r: int(r[0])))
