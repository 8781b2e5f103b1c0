"""Input specs -> image file URIs: folders, list files and globs, local or on any filesystem
fsspec knows (``s3://`` with ``s3fs``, ``gs://`` with ``gcsfs``, ...).

Listing goes through fsspec; the files themselves are read by Ray Data, which resolves each
URI's filesystem (pyarrow's native S3/GCS/HDFS, else fsspec). Local paths become absolute: on a
cluster they must be readable on every node (shared storage); for data on one machine only,
put it in object storage.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from quench.errors import QuenchError
from quench.evaluate import list_entries
from quench.imaging import IMAGE_SUFFIXES
from quench.ray.cluster import INSTALL_HINT

LIST_SUFFIXES = frozenset({".txt", ".lst", ".list", ".csv", ".tsv"})
_GLOB = re.compile(r"[*?\[]")


@dataclass
class Inputs:
    """Image URIs in input order (duplicates dropped) and the named files that do not exist
    (entries of list files are not looked up one by one: Ray's read reports them)."""

    files: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def add(self, uri: str, seen: set[str]) -> None:
        if uri not in seen:
            seen.add(uri)
            self.files.append(uri)


def _fs(spec: str) -> tuple[Any, str, str]:
    """(fsspec filesystem, path within it, URI prefix) for a spec."""
    try:
        import fsspec
    except ImportError:
        raise QuenchError(INSTALL_HINT) from None

    try:
        fs, path = fsspec.core.url_to_fs(spec)
    except (ImportError, ValueError) as exc:
        raise QuenchError(f"{spec}: no filesystem for this path ({exc})") from None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    return fs, path, prefix


def scheme_of(uri: str) -> str:
    """The URI's scheme ('' for a local path)."""
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return m.group(1).lower() if m and m.group(1).lower() not in ("file", "local") else ""


def _is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_SUFFIXES


def resolve(specs: list[str]) -> Inputs:
    """Every image a list of specs names: a folder (recursive, image suffixes, sorted), a list
    file (``.txt``/``.lst``/``.list``/``.csv``/``.tsv``; relative entries against its folder), a
    glob, or an image file. A named file that does not exist is kept in ``missing``."""
    out = Inputs()
    seen: set[str] = set()
    for spec in specs:
        fs, path, prefix = _fs(str(spec))
        if _GLOB.search(path):
            for p in sorted(fs.glob(path)):
                if fs.isdir(p):
                    for q in sorted(fs.find(p)):
                        if _is_image(q):
                            out.add(prefix + q, seen)
                else:
                    out.add(prefix + p, seen)
            continue
        try:
            info = fs.info(path)
        except FileNotFoundError:
            out.missing.append(prefix + path)
            continue
        except OSError as exc:
            raise QuenchError(f"{spec}: cannot read ({exc})") from None
        if info.get("type") == "directory":
            for q in sorted(fs.find(path)):
                if _is_image(q):
                    out.add(prefix + q, seen)
        elif posixpath.splitext(path)[1].lower() in LIST_SUFFIXES:
            try:
                text = fs.cat_file(path).decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise QuenchError(f"{spec}: cannot read image list ({exc})") from None
            base = posixpath.dirname(path)
            for entry in list_entries(text):
                if scheme_of(entry):
                    out.add(entry, seen)
                else:
                    p = entry if posixpath.isabs(entry) else posixpath.join(base, entry)
                    out.add(prefix + posixpath.normpath(p), seen)
        else:
            out.add(prefix + path, seen)
    return out
