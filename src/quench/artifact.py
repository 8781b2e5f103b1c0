"""The ``.quench`` artifact: one zip file holding a JSON manifest and the engine payload(s).

Layout::

    manifest.json          every setting needed to run the model (see ``quench.manifest.Manifest``)
    payload/<name>         engine files (e.g. ``model.onnx``), stored uncompressed
    manifest.sha256        sha256 of manifest.json; the manifest lists each payload's sha256
    signature.json         optional: an Ed25519 signature of that sha256 (``quench.signing``)

Nothing in an artifact is ever executed or unpickled: the manifest is JSON and the payloads are
handed to the engine as model bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from quench import __version__
from quench.destination import check_file
from quench.errors import ArtifactError
from quench.manifest import FORMAT, FORMAT_VERSION, VOLATILE

MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
SIGNATURE = "signature.json"
PAYLOAD_DIR = "payload/"
# Uncompressed size bounds, checked before a member is read (zip bombs): the manifest and the
# signature are small JSON files; payloads are stored uncompressed, so none can be larger than
# the artifact file itself.
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIGNATURE_BYTES = 64 << 10
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
    manifest_sha256: str | None = None  # of manifest.json as read (what a signature signs)
    signature: dict[str, Any] | None = None  # signature.json as read (see quench.signing)

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


def save(artifact: Artifact, path: str | Path, sign: Callable[[str], Any] | None = None) -> Path:
    """Write the artifact atomically (temp file, fsync, rename, fsync of the folder); returns
    the path. ``sign`` (see :func:`quench.signing.signer`) maps the manifest's sha256 to the
    signature record stored as ``signature.json``."""
    path = Path(path)
    check_file(path)
    manifest = artifact.manifest  # completed in place: a Model holding it sees the final form
    manifest["format"] = FORMAT
    manifest["format_version"] = FORMAT_VERSION
    manifest.setdefault("quench_version", __version__)
    manifest["payloads"] = {n: sha256_bytes(b) for n, b in sorted(artifact.payloads.items())}
    manifest["content_digest"] = Artifact(manifest, artifact.payloads).content_digest
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    artifact.manifest_sha256 = sha256_bytes(body)
    artifact.signature = sign(artifact.manifest_sha256) if sign else None
    with _temp_file(path) as fh, zipfile.ZipFile(fh, "w") as zf:
        _write(zf, MANIFEST, body, zipfile.ZIP_DEFLATED)
        _write(zf, MANIFEST_DIGEST, artifact.manifest_sha256.encode(), zipfile.ZIP_STORED)
        if artifact.signature is not None:
            record = json.dumps(artifact.signature, indent=2, sort_keys=True).encode()
            _write(zf, SIGNATURE, record, zipfile.ZIP_DEFLATED)
        for name, data in sorted(artifact.payloads.items()):
            _write(zf, PAYLOAD_DIR + name, data, zipfile.ZIP_STORED)
    return path


@contextmanager
def _temp_file(path: Path) -> Iterator[BinaryIO]:
    """A new file beside ``path``, renamed over it once the block succeeds: created like any
    file (mode 0666 less the umask), flushed to disk before the rename, and removed on any
    exception, Ctrl-C or a SIGTERM the CLI turns into an exception."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the OS allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(zf: zipfile.ZipFile, name: str, data: bytes, compression: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
    info.compress_type = compression
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and verify only the manifest (cheap: payloads are not read)."""
    with _open(Path(path)) as zf:
        return _manifest(zf, Path(path))[0]


def load(path: str | Path) -> Artifact:
    """Read an artifact, verifying format version and every checksum."""
    path = Path(path)
    with _open(path) as zf:
        manifest, manifest_sha256 = _manifest(zf, path)
        expected = manifest.get("payloads", {})
        if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
            raise ArtifactError(f"{path}: manifest field 'payloads': expected name -> sha256")
        present = {n[len(PAYLOAD_DIR) :] for n in zf.namelist() if n.startswith(PAYLOAD_DIR)}
        if present != set(expected):
            raise ArtifactError(
                f"{path}: payload files {sorted(present)} do not match the manifest's "
                f"{sorted(expected)} (tampered or incomplete artifact)"
            )
        limit = path.stat().st_size
        payloads = {}
        for name, digest in expected.items():
            info = zf.getinfo(PAYLOAD_DIR + name)
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > limit:
                raise ArtifactError(
                    f"{path}: payload {name} is compressed or larger than the file "
                    f"({info.file_size:,} bytes); not written by Quench (tampered artifact)"
                )
            data = _read(zf, PAYLOAD_DIR + name, path, f"payload {name}")
            if sha256_bytes(data) != digest:
                raise ArtifactError(
                    f"{path}: checksum mismatch in payload {name} (corrupted or tampered artifact)"
                )
            payloads[name] = data
        signature = _signature(zf, path)
    return Artifact(manifest, payloads, manifest_sha256, signature)


def _read(zf: zipfile.ZipFile, member: str, path: Path, what: str, limit: int = -1) -> bytes:
    """A member's bytes, its uncompressed size bounded by ``limit`` before anything is read."""
    size = zf.getinfo(member).file_size
    if limit >= 0 and size > limit:
        raise ArtifactError(
            f"{path}: {member} is {size:,} bytes uncompressed, over the {limit:,} byte limit "
            "(zip bomb or not a Quench artifact)"
        )
    try:
        return zf.read(member)
    except _ZIP_ERRORS as exc:
        how = "checksum mismatch in" if "CRC" in str(exc) else "cannot read"
        raise ArtifactError(
            f"{path}: {how} {what} ({exc}); corrupted or tampered artifact"
        ) from None


def _open(path: Path) -> zipfile.ZipFile:
    if path.exists() and not path.is_dir() and not path.is_file():
        raise ArtifactError(f"{path}: not a regular file")
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


def _manifest(zf: zipfile.ZipFile, path: Path) -> tuple[dict[str, Any], str]:
    """The manifest, checked against its digest, and that digest."""
    names = set(zf.namelist())
    for member in (MANIFEST, MANIFEST_DIGEST):
        if member not in names:
            raise ArtifactError(f"{path}: not a Quench artifact (missing {member})")
    body = _read(zf, MANIFEST, path, MANIFEST, MAX_MANIFEST_BYTES)
    try:
        digest = _read(zf, MANIFEST_DIGEST, path, MANIFEST_DIGEST, 1024).decode().strip()
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: corrupted artifact ({exc})") from None
    if sha256_bytes(body) != digest:
        raise ArtifactError(f"{path}: manifest checksum mismatch (corrupted or tampered artifact)")
    try:
        manifest = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a Quench artifact (format field missing or wrong)")
    version = manifest.get("format_version")
    if "format_version" not in manifest:
        raise ArtifactError(f"{path}: manifest field 'format_version': missing")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        shown = json.dumps(version)[:40]
        raise ArtifactError(
            f"{path}: manifest field 'format_version': expected an integer >= 1, got {shown}"
        )
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format {version} was written by Quench "
            f"{manifest.get('quench_version', '?')}; this Quench {__version__} reads format "
            f"<= {FORMAT_VERSION}. Upgrade Quench or rebuild the artifact."
        )
    return manifest, digest


def _signature(zf: zipfile.ZipFile, path: Path) -> dict[str, Any] | None:
    """``signature.json`` as stored (checked by :mod:`quench.signing`), or None."""
    if SIGNATURE not in zf.namelist():
        return None
    body = _read(zf, SIGNATURE, path, SIGNATURE, MAX_SIGNATURE_BYTES)
    try:
        record = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: {SIGNATURE} is not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ArtifactError(f"{path}: {SIGNATURE} is not a JSON object")
    return record
