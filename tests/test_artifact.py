"""The .quench artifact: round trip, reproducibility, and refusal of damaged or foreign files."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import stat
import struct
import tokenize
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest

import quench
from conftest import TINY_BUILD
from quench import artifact
from quench.artifact import Artifact, load, read_manifest, save
from quench.builder import build
from quench.errors import ArtifactError, QuenchError

PAYLOAD = "payload/model.onnx"
SRC = Path(quench.__file__).parent


# -- helpers ---------------------------------------------------------------------------------


def _sample() -> Artifact:
    return Artifact(
        {
            "name": "sample",
            "created": "2024-01-02T03:04:05+00:00",
            "labels": ["cat", "dog", "émeu"],
            "io": {"input": {"name": "x", "shape": ["N", 3, 8, 8]}},
            "nested": {"a": [1, 2.5, None, True]},
        },
        {"model.onnx": bytes(range(256)) * 9, "extra.bin": b""},
    )


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _rewrite(
    src: Path,
    dst: Path,
    replace: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
    add: dict[str, bytes] | None = None,
) -> Path:
    """A valid zip (fresh CRCs) with some members replaced, dropped or added: tampering."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename not in drop:
                zout.writestr(info, replace.get(info.filename, zin.read(info.filename)))
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


def _with_manifest(src: Path, dst: Path, edit) -> Path:
    """Rewrite manifest.json and its digest consistently (a well-formed but different manifest)."""
    manifest = json.loads(_members(src)["manifest.json"])
    body = edit(manifest)
    if not isinstance(body, bytes):
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    digest = hashlib.sha256(body).hexdigest().encode()
    return _rewrite(src, dst, {"manifest.json": body, "manifest.sha256": digest})


def _data_span(blob: bytes, name: str) -> tuple[int, int]:
    """Offset and length of a member's (stored) data inside the zip file bytes."""
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        info = zf.getinfo(name)
    h = info.header_offset
    assert blob[h : h + 4] == b"PK\x03\x04"
    name_len, extra_len = struct.unpack("<HH", blob[h + 26 : h + 30])
    return h + 30 + name_len + extra_len, info.compress_size


def _refused(path: Path, *phrases: str) -> str:
    with pytest.raises(ArtifactError) as exc:
        load(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "\n" not in msg
    for phrase in phrases:
        assert phrase in msg, msg
    return msg


# -- round trip and layout -------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    art = _sample()
    original = json.loads(json.dumps(art.manifest))
    (tmp_path / "sub").mkdir()  # save() creates no folders
    out = save(art, tmp_path / "sub" / "a.quench")
    assert out == tmp_path / "sub" / "a.quench"
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.quench"]  # no temp file left

    loaded = load(out)
    assert loaded.payloads == {"model.onnx": bytes(range(256)) * 9, "extra.bin": b""}
    assert loaded.manifest == art.manifest  # save() records what it wrote
    assert {k: loaded.manifest[k] for k in original} == original
    assert loaded.manifest["format"] == "quench-artifact"
    assert loaded.manifest["format_version"] == artifact.FORMAT_VERSION == 1
    assert loaded.manifest["quench_version"] == quench.__version__
    assert loaded.manifest["payloads"] == {
        "extra.bin": hashlib.sha256(b"").hexdigest(),
        "model.onnx": hashlib.sha256(bytes(range(256)) * 9).hexdigest(),
    }
    assert loaded.manifest["content_digest"] == loaded.content_digest
    assert read_manifest(out) == loaded.manifest


def test_zip_layout_and_fixed_timestamps(tmp_path: Path) -> None:
    out = save(_sample(), tmp_path / "a.quench")
    with zipfile.ZipFile(out) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == [
            "manifest.json",
            "manifest.sha256",
            "payload/extra.bin",
            "payload/model.onnx",
        ]
        for info in infos:
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr >> 16 == 0o644
        kinds = {i.filename: i.compress_type for i in infos}
        assert kinds[PAYLOAD] == kinds["payload/extra.bin"] == zipfile.ZIP_STORED
        body = zf.read("manifest.json")
        assert zf.read("manifest.sha256").decode() == hashlib.sha256(body).hexdigest()
        assert zf.read(PAYLOAD) == bytes(range(256)) * 9


def test_same_content_gives_same_bytes(tmp_path: Path) -> None:
    a = save(_sample(), tmp_path / "a.quench")
    b = save(_sample(), tmp_path / "b.quench")
    assert a.read_bytes() == b.read_bytes()
    # loading and saving again changes nothing either (content_digest excludes itself)
    c = save(load(a), tmp_path / "c.quench")
    assert c.read_bytes() == a.read_bytes()


def test_content_digest_ignores_only_the_build_date() -> None:
    base = _sample()
    same = _sample()
    same.manifest["created"] = "2030-12-31T00:00:00+00:00"
    same.manifest["build_seconds"] = 99.0
    assert same.content_digest == base.content_digest
    relabelled = _sample()
    relabelled.manifest["labels"][0] = "lion"
    assert relabelled.content_digest != base.content_digest
    other_payload = _sample()
    other_payload.payloads["model.onnx"] = b"\x01" + other_payload.payloads["model.onnx"][1:]
    assert other_payload.content_digest != base.content_digest
    renamed = _sample()
    renamed.payloads["other.onnx"] = renamed.payloads.pop("model.onnx")
    assert renamed.content_digest != base.content_digest


def test_two_builds_are_identical_apart_from_the_date(
    tmp_path: Path, tiny_model: Path, tiny_labels: Path
) -> None:
    a = load(build(tiny_model, tmp_path / "a.quench", labels=str(tiny_labels), **TINY_BUILD).path)
    b = load(build(tiny_model, tmp_path / "b.quench", labels=str(tiny_labels), **TINY_BUILD).path)
    assert a.payloads == b.payloads
    assert a.payloads["model.onnx"][:2]  # a real, non-empty ONNX payload
    assert a.content_digest == b.content_digest == a.manifest["content_digest"]
    assert b.manifest["content_digest"] == a.manifest["content_digest"]
    skip = {"created", "build_seconds", "timings"}  # what differs between equal builds
    assert {k: v for k, v in a.manifest.items() if k not in skip} == {
        k: v for k, v in b.manifest.items() if k not in skip
    }
    assert _members(tmp_path / "a.quench")[PAYLOAD] == _members(tmp_path / "b.quench")[PAYLOAD]


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["10", "half", "all-but-1", "no-end-record"])
def test_truncated_file(tmp_path: Path, tiny_artifact: Path, cut: str) -> None:
    blob = tiny_artifact.read_bytes()
    keep = {"10": 10, "half": len(blob) // 2, "all-but-1": len(blob) - 1, "no-end-record": -22}
    bad = tmp_path / "cut.quench"
    bad.write_bytes(blob[: keep[cut]])
    _refused(bad, "truncated", "quench build")


def test_random_bytes_empty_and_onnx_files(tmp_path: Path, tiny_model: Path) -> None:
    import numpy as np

    noise = tmp_path / "noise.quench"
    noise.write_bytes(np.random.default_rng(1).bytes(5000))
    _refused(noise, "not a Quench artifact")
    empty = tmp_path / "empty.quench"
    empty.write_bytes(b"")
    _refused(empty, "not a Quench artifact")
    _refused(tiny_model, "not a Quench artifact")  # an ONNX model where an artifact belongs


def test_flipped_payload_byte(tmp_path: Path, tiny_artifact: Path) -> None:
    blob = bytearray(tiny_artifact.read_bytes())
    start, size = _data_span(bytes(blob), PAYLOAD)
    assert blob[start : start + size] == load(tiny_artifact).payloads["model.onnx"]
    blob[start + size // 2] ^= 0x01
    bad = tmp_path / "flipped.quench"
    bad.write_bytes(blob)
    _refused(bad, "checksum mismatch", "model.onnx")
    # the manifest alone is intact: read_manifest (which skips payloads) still works
    assert read_manifest(bad)["name"] == load(tiny_artifact).manifest["name"]


def test_payload_replaced_in_a_valid_zip(tmp_path: Path, tiny_artifact: Path) -> None:
    data = bytearray(_members(tiny_artifact)[PAYLOAD])
    data[len(data) // 2] ^= 0x01
    bad = _rewrite(tiny_artifact, tmp_path / "tampered.quench", {PAYLOAD: bytes(data)})
    _refused(bad, "checksum mismatch in payload model.onnx")


def test_every_damaged_header_byte_is_refused_or_harmless(
    tmp_path: Path, tiny_artifact: Path
) -> None:
    """Flip each byte outside the payload data: load raises ArtifactError or reads the same."""
    blob = tiny_artifact.read_bytes()
    good = load(tiny_artifact)
    start, size = _data_span(blob, PAYLOAD)
    bad = tmp_path / "fuzz.quench"
    refused = 0
    positions = [*range(start), *range(start + size, len(blob)), start, start + size - 1]
    for n, i in enumerate(positions):
        damaged = bytearray(blob)
        damaged[i] ^= (0x01, 0x80, 0xFF, 0x10)[n % 4]
        bad.write_bytes(damaged)
        try:
            got = load(bad)
        except ArtifactError as exc:
            assert str(bad) in str(exc)
            refused += 1
        else:
            assert got.manifest == good.manifest, i
            assert got.payloads == good.payloads, i
    assert refused > 0.8 * len(positions)


def test_tampered_manifest(tmp_path: Path, tiny_artifact: Path) -> None:
    manifest = json.loads(_members(tiny_artifact)["manifest.json"])
    manifest["labels"][0] = "something else"
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    bad = _rewrite(tiny_artifact, tmp_path / "m.quench", {"manifest.json": body})
    _refused(bad, "manifest checksum mismatch")


def test_newer_format_version_asks_for_an_upgrade(tmp_path: Path, tiny_artifact: Path) -> None:
    bad = _with_manifest(
        tiny_artifact, tmp_path / "v99.quench", lambda m: m.update(format_version=99)
    )
    msg = _refused(bad, "artifact format 99", quench.__version__)
    assert "upgrade" in msg.lower()
    with pytest.raises(ArtifactError, match="Upgrade Quench"):
        read_manifest(bad)


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda m: m.update(format_version="1"), "field 'format_version': expected an integer"),
        (lambda m: m.pop("format_version"), "manifest field 'format_version': missing"),
        (lambda m: m.update(format_version=0), "field 'format_version': expected an integer"),
        (lambda m: m.update(format="something-else"), "format field missing or wrong"),
        (lambda m: m.pop("format"), "format field missing or wrong"),
        (lambda m: b"{not json", "manifest is not valid JSON"),
        (lambda m: b"[1, 2]", "format field missing or wrong"),
    ],
)
def test_consistent_but_foreign_manifest(tmp_path: Path, tiny_artifact: Path, edit, phrase) -> None:
    _refused(_with_manifest(tiny_artifact, tmp_path / "x.quench", edit), phrase)


def test_format_version_messages_make_sense(tmp_path: Path, tiny_artifact: Path) -> None:
    bad = _with_manifest(
        tiny_artifact, tmp_path / "s.quench", lambda m: m.update(format_version="1")
    )
    msg = _refused(bad, "manifest field 'format_version': expected an integer >= 1, got \"1\"")
    assert "reads format" not in msg and "Upgrade" not in msg
    bad = _with_manifest(tiny_artifact, tmp_path / "n.quench", lambda m: m.pop("format_version"))
    msg = _refused(bad, "manifest field 'format_version': missing")
    assert "None" not in msg


def test_extra_payload_member(tmp_path: Path, tiny_artifact: Path) -> None:
    bad = _rewrite(tiny_artifact, tmp_path / "extra.quench", add={"payload/evil.so": b"\x7fELF"})
    _refused(bad, "payload files ['evil.so', 'model.onnx', 'selfcheck/", "['model.onnx', 'selfc")


def test_missing_payload_member(tmp_path: Path, tiny_artifact: Path) -> None:
    bad = _rewrite(tiny_artifact, tmp_path / "missing.quench", drop=(PAYLOAD,))
    _refused(bad, "payload files ['selfcheck/inputs.npy', 'selfcheck/reference.npy'] do not")


@pytest.mark.parametrize("member", ["manifest.json", "manifest.sha256"])
def test_missing_manifest_member(tmp_path: Path, tiny_artifact: Path, member: str) -> None:
    bad = _rewrite(tiny_artifact, tmp_path / "nomanifest.quench", drop=(member,))
    _refused(bad, f"missing {member}")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.quench", "no such artifact file")
    _refused(tmp_path, "is a directory")
    with pytest.raises(ArtifactError, match="no such artifact file"):
        read_manifest(tmp_path / "nope.quench")


# -- zip bombs -------------------------------------------------------------------------------

_GIB = 1 << 30


def _deflated_spaces(size: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``size`` spaces (1 MiB blocks, each made once) and its CRC."""
    chunk = b" " * (1 << 20)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = z.compress(chunk) + z.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, no history
    crc = 0
    for _ in range(size // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    return block * (size // len(chunk)) + z.flush(), crc


def _handmade_zip(path: Path, members: list[tuple[str, int, bytes, int, int]]) -> Path:
    """A zip of (name, method, stored bytes, crc, uncompressed size) members, written by hand
    (zipfile would compress the gigabyte itself)."""
    out = bytearray()
    central = bytearray()
    for name, method, data, crc, size in members:
        offset = len(out)
        fields = (20, 0, method, 0, 0x21, crc, len(data), size, len(name))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + name.encode() + data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *fields, 0, 0, 0, 0, 0, offset)
        central += name.encode()
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central),
                      len(out), 0)  # fmt: skip
    path.write_bytes(bytes(out + central + end))
    return path


def test_manifest_zip_bomb_is_refused_before_reading(tmp_path: Path) -> None:
    """A 1 MB artifact whose manifest inflates to 1 GiB: refused from its declared size, in
    bounded memory, without inflating it."""
    data, crc = _deflated_spaces(_GIB)
    digest = b"0" * 64
    bomb = _handmade_zip(
        tmp_path / "bomb.quench",
        [
            ("manifest.json", zipfile.ZIP_DEFLATED, data, crc, _GIB),
            ("manifest.sha256", zipfile.ZIP_STORED, digest, zlib.crc32(digest), len(digest)),
        ],
    )
    assert bomb.stat().st_size < 2_000_000
    with zipfile.ZipFile(bomb) as zf:
        assert zf.getinfo("manifest.json").file_size == _GIB
    tracemalloc.start()
    try:
        msg = _refused(bomb, "manifest.json is 1,073,741,824 bytes uncompressed, over the")
        with pytest.raises(ArtifactError, match="over the 16,777,216 byte limit"):
            read_manifest(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert "zip bomb" in msg


def test_compressed_payload_is_refused(tmp_path: Path, tiny_artifact: Path) -> None:
    """Payloads are stored: a deflated one (which could inflate past the file) is refused
    before it is read."""
    members = _members(tiny_artifact)
    bad = tmp_path / "deflated.quench"
    with zipfile.ZipFile(bad, "w") as zout:
        for name, data in members.items():
            method = zipfile.ZIP_DEFLATED if name == PAYLOAD else zipfile.ZIP_STORED
            zout.writestr(name, data, compress_type=method)
    _refused(bad, "payload model.onnx is compressed or larger than the file")


def test_signature_member_is_bounded(tmp_path: Path, tiny_artifact: Path) -> None:
    bad = _rewrite(tiny_artifact, tmp_path / "s.quench", add={"signature.json": b" " * 70_000})
    _refused(bad, "signature.json is 70,000 bytes uncompressed, over the 65,536 byte limit")


def test_deeply_nested_manifest_is_one_line(tmp_path: Path, tiny_artifact: Path) -> None:
    bad = _with_manifest(tiny_artifact, tmp_path / "deep.quench", lambda m: b"[" * 200_000)
    _refused(bad, "manifest is not valid JSON")


# -- writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_artifact_mode_follows_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        out = save(_sample(), tmp_path / "a.quench")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_save_fsyncs_the_file_then_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[str, bool]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append(("dir" if stat.S_ISDIR(mode) else "file", (tmp_path / "a.quench").exists()))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        synced.append(("rename", True))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save(_sample(), tmp_path / "a.quench")
    # the data reaches the disk before the rename makes it visible; then the rename itself
    assert synced == [("file", False), ("rename", True), ("dir", True)]


def test_interrupted_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = save(_sample(), tmp_path / "a.quench")
    before = target.read_bytes()
    calls = 0
    real = artifact._write

    def write(*args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(artifact, "_write", write)
    with pytest.raises(KeyboardInterrupt):
        save(_sample(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.quench"]
    assert target.read_bytes() == before


@pytest.mark.parametrize("where", ["missing", "file"])
def test_save_creates_no_folders(tmp_path: Path, where: str) -> None:
    parent = tmp_path / "sub"
    if where == "file":
        parent.write_text("x")
    with pytest.raises(QuenchError, match="cannot write there: the folder"):
        save(_sample(), parent / "deeper" / "a.quench")
    assert not (parent / "deeper").exists()
    with pytest.raises(QuenchError, match="is a folder"):
        save(_sample(), tmp_path)


# -- nothing executable ----------------------------------------------------------------------

_FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
_FORBIDDEN_MODULES |= {"marshal"}
_CODE_PATTERN = re.compile(r"pickle|(?<![\w.])(?:eval|exec)\s*\(|__import__\s*\(", re.IGNORECASE)


def _code_only(text: str) -> str:
    """Source with strings (docstrings) and comments removed."""
    kept = [
        tok.string
        for tok in tokenize.generate_tokens(io.StringIO(text).readline)
        if tok.type not in (tokenize.STRING, tokenize.COMMENT)
    ]
    return " ".join(kept)


def _violations(text: str) -> list[str]:
    found = [m.group(0) for m in _CODE_PATTERN.finditer(_code_only(text))]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in _FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in _FORBIDDEN_MODULES:
                found.append(node.module)
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            found.append("allow_pickle")
    return found


def test_the_checker_catches_what_it_should() -> None:
    assert _violations("import pickle\n")
    assert _violations("from marshal import loads\n")
    assert _violations("x = eval(s)\n")
    assert _violations("exec (code)\n")
    assert _violations("np.load(f, allow_pickle=True)\n")
    assert not _violations('"""never unpickled or eval(uated)"""\nmodel.evaluate(x)\n')


def test_no_pickle_eval_or_exec_in_src() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 15 and SRC / "artifact.py" in files
    bad = {str(f.relative_to(SRC)): v for f in files if (v := _violations(f.read_text()))}
    assert bad == {}
