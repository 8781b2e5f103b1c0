"""Ed25519 signatures of artifacts (``cryptography``): sign at build, check before loading.

What is signed: the sha256 of ``manifest.json`` (the ``manifest.sha256`` member), prefixed by
a fixed context string. The manifest lists the sha256 of every payload and loading checks
each of them, so the signature covers every byte Quench reads. It lives in the artifact as
``signature.json``: the algorithm, the signer's key id (sha256 of the raw public key) and
the signature, in base64.

Keys are PEM files as ``quench keygen`` or OpenSSL write them (``openssl genpkey -algorithm
ed25519 -out key.pem`` and ``openssl pkey -in key.pem -pubout -out key.pub``); public keys
may also be OpenSSH ``ssh-ed25519`` lines.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from quench.artifact import Artifact
from quench.errors import QuenchError, SignatureError

ALGORITHM = "ed25519"
CONTEXT = b"quench-artifact-signature-v1\n"  # signed: CONTEXT + manifest sha256 (hex)
PUBLIC_SUFFIX = ".pub"


def key_id(key: Ed25519PublicKey) -> str:
    """The sha256 of the raw 32-byte public key, hex: how a signature names its key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _read_key_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise QuenchError(f"{path}: no such {what} file" + (" (a folder)" if path.is_dir() else ""))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise QuenchError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8 or OpenSSH)."""
    path = Path(path)
    data = _read_key_file(path, "private key")
    key: Any = None
    errors = []
    for load in (serialization.load_pem_private_key, serialization.load_ssh_private_key):
        try:
            key = load(data, password=None)
            break
        except TypeError:
            raise QuenchError(f"{path}: encrypted private keys are not supported") from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if key is None:
        raise QuenchError(f"{path}: not a PEM private key ({errors[0]})")
    if not isinstance(key, Ed25519PrivateKey):
        raise QuenchError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file or an OpenSSH ``ssh-ed25519`` line."""
    path = Path(path)
    data = _read_key_file(path, "public key")
    key: Any = None
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QuenchError(f"{path}: not a public key ({first})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise QuenchError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def trusted_keys(spec: str | Path) -> dict[str, Ed25519PublicKey]:
    """Public keys by key id: one key file, or every ``*.pub`` file of a folder."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == PUBLIC_SUFFIX and p.is_file())
        if not files:
            raise QuenchError(f"{path}: no public keys (*{PUBLIC_SUFFIX} files) in this folder")
    else:
        files = [path]
    keys = [load_public_key(f) for f in files]
    return {key_id(k): k for k in keys}


def generate(private_path: str | Path) -> tuple[Path, Path]:
    """Write a new key pair: ``private_path`` (PKCS#8 PEM, mode 0600) and ``<it>.pub``.
    Refuses to overwrite either file."""
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + PUBLIC_SUFFIX)
    for p in (private_path, public_path):
        if p.exists():
            raise QuenchError(f"{p}: already exists; not overwriting a key")
        if not p.parent.is_dir():
            raise QuenchError(f"{p}: cannot write there: the folder {p.parent} does not exist")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def signer(key: Ed25519PrivateKey) -> Any:
    """The ``sign`` callable :func:`quench.artifact.save` takes: manifest sha256 -> record."""

    def sign(manifest_sha256: str) -> dict[str, Any]:
        return {
            "algorithm": ALGORITHM,
            "key_id": key_id(key.public_key()),
            "signed": "manifest.sha256",
            "signature": base64.b64encode(key.sign(CONTEXT + manifest_sha256.encode())).decode(),
        }

    return sign


@dataclass(frozen=True)
class Verified:
    key_id: str
    path: str | None = None

    @property
    def message(self) -> str:
        return f"signature good (Ed25519 key {self.key_id[:16]})"


def verify(art: Artifact, keys: dict[str, Ed25519PublicKey], where: str | None = None) -> Verified:
    """Check ``art``'s signature against ``keys`` (by key id); a one-line
    :class:`SignatureError` when it is unsigned, signed by another key, or does not verify."""
    name = f"{where}: " if where else ""
    if not keys:
        raise SignatureError(f"{name}no trusted public keys given")
    record = art.signature
    if record is None:
        raise SignatureError(f"{name}not signed (build it with 'quench build --sign KEY')")
    if record.get("algorithm") != ALGORITHM or record.get("signed") != "manifest.sha256":
        raise SignatureError(
            f"{name}signature.json: unsupported signature {record.get('algorithm')!r}"
        )
    kid = record.get("key_id")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise SignatureError(
            f"{name}signed by key {str(kid)[:16]}, which is not among the "
            f"{len(keys)} trusted key(s)"
        )
    try:
        sig = base64.b64decode(str(record.get("signature", "")), validate=True)
    except ValueError:
        raise SignatureError(f"{name}signature.json: the signature is not base64") from None
    if art.manifest_sha256 is None:
        raise SignatureError(f"{name}the manifest digest is unknown (not loaded from a file)")
    try:
        key.verify(sig, CONTEXT + art.manifest_sha256.encode())
    except InvalidSignature:
        raise SignatureError(
            f"{name}bad signature: the artifact was changed after it was signed by key {kid[:16]}"
        ) from None
    return Verified(kid, where)
