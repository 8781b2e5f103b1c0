"""Output paths, checked before any work starts: a one-line error instead of a traceback at
the end (or folders silently created)."""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from quench.errors import QuenchError


def check_file(path: str | Path, suffixes: Collection[str] | None = None) -> Path:
    """Refuse an output file that cannot be written: its folder missing, not a folder or not
    writable, the path a folder, or (with ``suffixes``) a format Quench does not write."""
    path = Path(path)
    if path.is_dir():
        raise QuenchError(f"{path}: is a folder; give a file name")
    if path.exists() and not path.is_file():
        raise QuenchError(f"{path}: exists and is not a regular file")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise QuenchError(
            f"{path}: unknown output format {path.suffix or '(no suffix)'!r}; "
            f"use {', '.join(sorted(suffixes))}"
        )
    _writable_folder(path.parent, path)
    return path


def check_folder(path: str | Path) -> Path:
    """Refuse an output folder that exists as a file, or whose nearest existing ancestor is
    not a writable folder (missing folders below it are created when written)."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise QuenchError(f"{path}: exists and is not a folder")
        _writable_folder(path, path)
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise QuenchError(f"{path}: cannot create it: {ancestor} is not a folder")
    _writable_folder(ancestor, path)
    return path


def _writable_folder(folder: Path, path: Path) -> None:
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise QuenchError(f"{path}: cannot write there: the folder {folder} {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise QuenchError(f"{path}: cannot write there: no write permission on {folder}")
