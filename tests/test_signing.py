"""Signed artifacts: keygen, build --sign, verify --key, serve --trusted-keys, and the API."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from typer.testing import CliRunner, Result

from conftest import TINY_BUILD, edited_manifest
from quench import artifact, signing
from quench.builder import build
from quench.errors import QuenchError, SignatureError
from quench.model import Model

runner = CliRunner()
FLAGS = ["--preset", "imagenet", "--resize", "36", "--crop", "32", "--mean", "120,115,100"]
FLAGS += ["--std", "60", "--engine", "onnxruntime", "-q"]


def invoke(*args: object) -> Result:
    from quench.cli import app

    return runner.invoke(app, [str(a) for a in args])


def _error(res: Result) -> str:
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    res = invoke("keygen", "-o", d / "alice")
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stderr and "alice.pub" in res.stderr
    signing.generate(d / "mallory")
    trusted = d / "trusted"
    trusted.mkdir()
    (trusted / "alice.pub").write_bytes((d / "alice.pub").read_bytes())
    (trusted / "README").write_text("not a key: only *.pub files are read")
    return {
        "alice": d / "alice",
        "alice_pub": d / "alice.pub",
        "mallory": d / "mallory",
        "mallory_pub": d / "mallory.pub",
        "trusted": trusted,
    }


@pytest.fixture(scope="module")
def signed(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    tiny_labels: Path,
    keys: dict[str, Path],
) -> Path:
    out = tmp_path_factory.mktemp("signed") / "tiny.quench"
    res = invoke(
        "build", tiny_model, "-o", out, *FLAGS, "--labels", tiny_labels, "--sign", keys["alice"]
    )
    assert res.exit_code == 0, res.output
    return out


def _tampered(src: Path, dst: Path) -> Path:
    """The label of class 0 edited and every checksum recomputed: consistent, but not what
    was signed (the signature member kept as it was)."""
    return edited_manifest(src, dst, lambda m: m["labels"].__setitem__(0, "something else"))


def test_keygen_files(keys: dict[str, Path]) -> None:
    assert stat.S_IMODE(keys["alice"].stat().st_mode) == 0o600
    assert keys["alice"].read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert keys["alice_pub"].read_text().startswith("-----BEGIN PUBLIC KEY-----")
    line = _error(invoke("keygen", "-o", keys["alice"]))
    assert "already exists; not overwriting a key" in line


def test_signature_lives_in_the_artifact(signed: Path, keys: dict[str, Path]) -> None:
    with zipfile.ZipFile(signed) as zf:
        record = json.loads(zf.read("signature.json"))
        digest = zf.read("manifest.sha256").decode()
    alice = signing.load_public_key(keys["alice_pub"])
    assert record["algorithm"] == "ed25519" and record["signed"] == "manifest.sha256"
    assert record["key_id"] == signing.key_id(alice)
    art = artifact.load(signed)
    assert art.manifest_sha256 == digest and art.signature == record


def test_verify_good_signature(signed: Path, keys: dict[str, Path]) -> None:
    res = invoke("verify", signed, "--key", keys["alice_pub"])
    assert res.exit_code == 0, res.output
    kid = signing.key_id(signing.load_public_key(keys["alice_pub"]))
    assert f"{signed}: signature good (Ed25519 key {kid[:16]})" in res.stdout
    res = invoke("verify", signed, "--key", keys["trusted"], "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["signature"] == {"key_id": kid}


def test_verify_tampered_artifact(tmp_path: Path, signed: Path, keys: dict[str, Path]) -> None:
    bad = _tampered(signed, tmp_path / "tampered.quench")
    assert Model.load(bad, check="off").labels[0] == "something else"  # checksums agree
    line = _error(invoke("verify", bad, "--key", keys["alice_pub"]))
    assert line.startswith(f"error: {bad}: bad signature: the artifact was changed after")


def test_verify_wrong_key(signed: Path, keys: dict[str, Path]) -> None:
    line = _error(invoke("verify", signed, "--key", keys["mallory_pub"]))
    assert "which is not among the 1 trusted key(s)" in line and str(signed) in line


def test_a_forged_record_for_a_trusted_key_id_fails(
    tmp_path: Path, signed: Path, keys: dict[str, Path]
) -> None:
    """Mallory re-signs an edited artifact and claims Alice's key id."""
    bad = _tampered(signed, tmp_path / "forged.quench")
    art = artifact.load(bad)
    assert art.manifest_sha256 is not None
    record = signing.signer(signing.load_private_key(keys["mallory"]))(art.manifest_sha256)
    record["key_id"] = art.signature["key_id"] if art.signature else ""
    art.signature = record
    with pytest.raises(SignatureError, match="bad signature"):
        signing.verify(art, signing.trusted_keys(keys["trusted"]), str(bad))


def test_unsigned_artifact(tiny_artifact: Path, keys: dict[str, Path]) -> None:
    line = _error(invoke("verify", tiny_artifact, "--key", keys["alice_pub"]))
    assert f"{tiny_artifact}: not signed (build it with 'quench build --sign KEY')" in line
    with pytest.raises(SignatureError, match="not signed"):
        Model.load(tiny_artifact, trusted_keys=signing.trusted_keys(keys["trusted"]))
    assert invoke("verify", tiny_artifact).exit_code == 0  # no --key: the self-check only


def test_api_signs_and_checks(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path, keys: dict[str, Path]
) -> None:
    out = tmp_path / "api.quench"
    key = signing.load_private_key(keys["alice"])
    build(tiny_model, out, labels=str(tiny_labels), sign_key=key, **TINY_BUILD)
    with Model.load(out, trusted_keys=signing.trusted_keys(keys["alice_pub"])) as m:
        assert m.signature.key_id == signing.key_id(key.public_key())


def test_bad_key_files(tmp_path: Path, tiny_model: Path, keys: dict[str, Path]) -> None:
    ec = tmp_path / "ec.pem"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    out = tmp_path / "x.quench"
    line = _error(invoke("build", tiny_model, "-o", out, *FLAGS, "--sign", ec))
    assert f"{ec}: not an Ed25519 key" in line
    line = _error(invoke("build", tiny_model, "-o", out, *FLAGS, "--sign", keys["alice_pub"]))
    assert "not a PEM private key" in line
    assert not out.exists()
    with pytest.raises(QuenchError, match="not a public key"):
        signing.trusted_keys(junk)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QuenchError, match=r"no public keys \(\*\.pub files\)"):
        signing.trusted_keys(empty)


def test_openssh_public_key_is_accepted(
    tmp_path: Path, signed: Path, keys: dict[str, Path]
) -> None:
    pub = signing.load_private_key(keys["alice"]).public_key()
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "alice.pub").write_bytes(line + b" alice@example\n")
    assert invoke("verify", signed, "--key", tmp_path / "alice.pub").exit_code == 0


# -- serve --trusted-keys --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["unsigned", "wrong key", "tampered"])
def test_serve_refuses_before_listening(
    tmp_path: Path, tiny_artifact: Path, signed: Path, keys: dict[str, Path], which: str
) -> None:
    art = {
        "unsigned": tiny_artifact,
        "wrong key": signed,
        "tampered": _tampered(signed, tmp_path / "t.quench"),
    }[which]
    trusted = keys["trusted"]
    if which == "wrong key":
        trusted = tmp_path / "others"
        trusted.mkdir()
        (trusted / "mallory.pub").write_bytes(keys["mallory_pub"].read_bytes())
    res = invoke("serve", art, "--trusted-keys", trusted, "--port", _free_port())
    line = _error(res)
    assert str(art) in line
    assert {"unsigned": "not signed", "wrong key": "not among", "tampered": "bad signature"}[
        which
    ] in line
    assert "serving" not in res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_a_signed_artifact(signed: Path, keys: dict[str, Path]) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "quench", "serve", str(signed), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--trusted-keys", str(keys["trusted"]), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                url = f"http://127.0.0.1:{port}/v2/health/ready"
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server never ready"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "signature good (Ed25519 key" in err
