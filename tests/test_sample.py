"""`quench fetch imagenet-sample`: download, check, split, against a local HTTP server."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from quench.cli import app
from quench.errors import FetchError
from quench.labels import imagenet_wnids, load_labels
from quench.zoo import sample
from quench.zoo.fetch import cache_dir
from quench.zoo.sample import SampleSpec, fetch_sample, find_sample
from test_fetch import Server, _env  # noqa: F401  (_env: the same isolated cache and no proxy)

COUNT = 20  # classes 0, 50, 100, ... of ImageNet-1k, one image each


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    names = load_labels("imagenet-1k")
    wnids = imagenet_wnids()
    out = {}
    for k in range(COUNT):
        i = 50 * k
        out[f"{wnids[i]}_{names[i].replace(' ', '_').replace('/', '_')}.JPEG"] = _jpeg(i)
    return out


IMAGES = _images()


def _digest(images: dict[str, bytes]) -> str:
    lines = [f"{n} {hashlib.sha256(b).hexdigest()}" for n, b in sorted(images.items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _archive(images: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("imagenet-sample-images-abc/README.md", "# sample\n")
        for n, b in images.items():
            zf.writestr(f"imagenet-sample-images-abc/{n}", b)
    return buf.getvalue()


ARCHIVE = _archive(IMAGES)
SPEC = SampleSpec(url="unused", images=COUNT, content_sha256=_digest(IMAGES))


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    s.body = ARCHIVE
    yield s
    s.close()


def _fetch(server: Server, **kw: object) -> sample.Sample:
    return fetch_sample(url=server.url, timeout=5, progress=False, spec=SPEC, **kw)  # type: ignore[arg-type]


def _part() -> Path:
    return cache_dir() / "data" / "imagenet-sample.zip.part"


def test_download_split_and_ground_truth(server: Server) -> None:
    s = _fetch(server)
    assert s.root == cache_dir() / "data" / "imagenet-sample" and not s.cached
    assert s.images == COUNT
    calib = s.calib.read_text().split()
    val = s.val.read_text().split()
    names = sorted(IMAGES)
    assert calib == [f"images/{n}" for n in names[::5]]  # every fifth, in name order
    assert not set(calib) & set(val) and len(calib) + len(val) == COUNT
    rows = [r.split("\t") for r in s.ground_truth.read_text().splitlines()[1:]]
    assert {f: int(i) for f, i in rows} == {f"images/{n}": 50 * k for k, n in enumerate(names)}
    for n, b in IMAGES.items():
        assert (s.root / "images" / n).read_bytes() == b
    assert not (s.root / "images" / "README.md").exists()
    assert not _part().exists()
    # second call: from the cache, no request
    again = _fetch(server)
    assert again.cached and len(server.requests) == 1


def test_the_real_sample_is_pinned() -> None:
    assert sample.URL.endswith(f"/archive/{sample.COMMIT}.zip") and sample.IMAGES == 1000
    assert len(sample.CONTENT_SHA256) == 64 and len(set(imagenet_wnids())) == 1000


def test_wrong_content_is_refused(server: Server) -> None:
    changed = dict(IMAGES)
    first = sorted(changed)[0]
    changed[first] = _jpeg(12345)
    server.body = _archive(changed)
    with pytest.raises(FetchError, match=r"not the expected sample \(content sha256"):
        _fetch(server)
    assert find_sample() is None and not _part().exists()
    assert not list((cache_dir() / "data").glob(".imagenet-sample.*"))  # no temp dir left


def test_wrong_count_is_refused(server: Server) -> None:
    server.body = _archive(dict(sorted(IMAGES.items())[:-1]))
    with pytest.raises(FetchError, match=rf"holds {COUNT - 1} ImageNet images, expected {COUNT}"):
        _fetch(server)
    assert find_sample() is None


def test_not_a_zip(server: Server) -> None:
    server.body = b"<html>not an archive</html>" * 10
    with pytest.raises(FetchError, match="is not a zip archive"):
        _fetch(server)


def test_truncated_archive_is_refused(server: Server) -> None:
    server.body = ARCHIVE[: len(ARCHIVE) * 2 // 3]  # complete transfer of a cut file
    with pytest.raises(FetchError):
        _fetch(server)
    assert find_sample() is None and not _part().exists()


def test_interrupted_then_resumed(server: Server) -> None:
    server.mode = "cut"
    with pytest.raises(FetchError, match=r"closed after \d+ of \d+ bytes.*--calib-images"):
        _fetch(server)
    assert _part().read_bytes() == ARCHIVE[: len(ARCHIVE) // 2]
    server.mode = "range"
    s = _fetch(server)
    assert s.images == COUNT and server.requests[-1] == f"bytes={len(ARCHIVE) // 2}-"


def test_offline_fails_fast_saying_what_to_pass() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError, match=r"cannot download imagenet-sample.*--images.*--labels"):
        fetch_sample(url=f"http://127.0.0.1:{port}/x.zip", timeout=3, progress=False, spec=SPEC)


def test_cli(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample, "SampleSpec", lambda: SPEC)
    r = CliRunner().invoke(app, ["fetch", "imagenet-sample", "--url", server.url, "-q", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["images"] == COUNT and Path(doc["val"]).is_file() and not doc["cached"]
    assert len(Path(doc["calib"]).read_text().split()) == COUNT // 5
