"""The ``.quench`` artifact: one zip file holding a JSON manifest and the engine payload(s).

Layout::

    manifest.json          every setting needed to run the model (see ``quench.manifest.Manifest``)
    payload/<name>         engine files (e.g. ``model.onnx``), stored uncompressed
    manifest.sha256        sha256 of manifest.json; the manifest lists each payload's sha256

Nothing in an artifact is ever executed or unpickled: the manifest is JSON and the payloads are
handed to the engine as model bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quench import __version__
from quench.errors import ArtifactError
from quench.manifest import FORMAT, FORMAT_VERSION, VOLATILE

MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
PAYLOAD_DIR = "payload/"
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # zip entry timestamps: builds are byte-reproducible
# What zipfile raises on damaged archives: a corrupt deflate stream, a bogus version or
# encryption flag (RuntimeError, NotImplementedError).
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Artifact:
    """A manifest (plain JSON data) and its payloads (name -> bytes)."""

    manifest: dict[str, Any]
    payloads: dict[str, bytes] = field(default_factory=dict)

    @property
    def content_digest(self) -> str:
        """sha256 over the build's content: equal for equal builds, whenever and wherever made.

        Left out: the fields ``Manifest`` marks volatile (the date, timings, the host, and
        measured figures that vary in the last bits).
        """
        m = {k: v for k, v in self.manifest.items() if k not in VOLATILE}
        h = hashlib.sha256(json.dumps(m, sort_keys=True).encode())
        for name in sorted(self.payloads):
            h.update(name.encode() + b"\0" + sha256_bytes(self.payloads[name]).encode())
        return h.hexdigest()


def save(artifact: Artifact, path: str | Path) -> Path:
    """Write the artifact atomically (temp file + rename); returns the path."""
    path = Path(path)
    manifest = artifact.manifest  # completed in place: a Model holding it sees the final form
    manifest["format"] = FORMAT
    manifest["format_version"] = FORMAT_VERSION
    manifest.setdefault("quench_version", __version__)
    manifest["payloads"] = {n: sha256_bytes(b) for n, b in sorted(artifact.payloads.items())}
    manifest["content_digest"] = Artifact(manifest, artifact.payloads).content_digest
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
            _write(zf, MANIFEST, body, zipfile.ZIP_DEFLATED)
            _write(zf, MANIFEST_DIGEST, sha256_bytes(body).encode(), zipfile.ZIP_STORED)
            for name, data in sorted(artifact.payloads.items()):
                _write(zf, PAYLOAD_DIR + name, data, zipfile.ZIP_STORED)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write(zf: zipfile.ZipFile, name: str, data: bytes, compression: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
    info.compress_type = compression
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and verify only the manifest (cheap: payloads are not read)."""
    with _open(Path(path)) as zf:
        return _manifest(zf, Path(path))


def load(path: str | Path) -> Artifact:
    """Read an artifact, verifying format version and every checksum."""
    path = Path(path)
    with _open(path) as zf:
        manifest = _manifest(zf, path)
        expected: dict[str, str] = manifest.get("payloads", {})
        present = {n[len(PAYLOAD_DIR) :] for n in zf.namelist() if n.startswith(PAYLOAD_DIR)}
        if present != set(expected):
            raise ArtifactError(
                f"{path}: payload files {sorted(present)} do not match the manifest's "
                f"{sorted(expected)} (tampered or incomplete artifact)"
            )
        payloads = {}
        for name, digest in expected.items():
            try:
                data = zf.read(PAYLOAD_DIR + name)
            except _ZIP_ERRORS as exc:
                what = "checksum mismatch in" if "CRC" in str(exc) else "cannot read"
                raise ArtifactError(
                    f"{path}: {what} payload {name} ({exc}); corrupted or tampered artifact"
                ) from None
            if sha256_bytes(data) != digest:
                raise ArtifactError(
                    f"{path}: checksum mismatch in payload {name} (corrupted or tampered artifact)"
                )
            payloads[name] = data
    return Artifact(manifest, payloads)


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such artifact file") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: is a directory, not an artifact") from None
    except _ZIP_ERRORS as exc:
        raise ArtifactError(
            f"{path}: not a Quench artifact or truncated ({exc}); rebuild it with 'quench build'"
        ) from None


def _manifest(zf: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    names = set(zf.namelist())
    for member in (MANIFEST, MANIFEST_DIGEST):
        if member not in names:
            raise ArtifactError(f"{path}: not a Quench artifact (missing {member})")
    try:
        body = zf.read(MANIFEST)
        digest = zf.read(MANIFEST_DIGEST).decode().strip()
    except (*_ZIP_ERRORS, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: corrupted artifact ({exc})") from None
    if sha256_bytes(body) != digest:
        raise ArtifactError(f"{path}: manifest checksum mismatch (corrupted or tampered artifact)")
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a Quench artifact (format field missing or wrong)")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format {version} was written by Quench "
            f"{manifest.get('quench_version', '?')}; this Quench {__version__} reads format "
            f"<= {FORMAT_VERSION}. Upgrade Quench or rebuild the artifact."
        )
    return manifest
