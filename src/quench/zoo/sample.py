"""The ImageNet sample: 1,000 real photos (one per class) for INT8 calibration and accuracy.

``fetch_sample`` downloads the archive of the public repository EliSchwartz/imagenet-sample-images
at a pinned commit (resumable, like a model download), checks its content (the 1,000 JPEG names
and a sha256 over every image's sha256, so a mirror with the same photos passes whatever its
packaging), extracts the images and writes, next to them:

- ``ground_truth.tsv``: file, class index (from the WordNet id that starts each file name,
  through Quench's own ImageNet label table);
- ``calib.txt``: every fifth image in name order (200), for calibration;
- ``val.txt``: the other 800, for accuracy. The two never overlap.

The result lives in ``<cache>/data/imagenet-sample/`` and is only moved there once complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from quench.errors import FetchError
from quench.labels import imagenet_wnids
from quench.progress import Bar
from quench.zoo.fetch import _Invalid, _NetError, _one_line, cache_dir, download, part_file

NAME = "imagenet-sample"
COMMIT = "bc69043e2862758a1906c6a24a792bb28c6bb2ff"
URL = f"https://github.com/EliSchwartz/imagenet-sample-images/archive/{COMMIT}.zip"
IMAGES = 1000
# sha256 of the lines "<file name> <sha256 of its bytes>" (sorted by name, joined by newlines)
CONTENT_SHA256 = "de08ab228c4af7865c8a18d0e3763cc80e8b7922b0674004a785385ff4efc04d"
CALIB_EVERY = 5
_IMAGE = re.compile(r"^(n\d{8})_[^/\\]*\.JPEG$")
_MAX_IMAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class Sample:
    """Where the sample is and its three lists."""

    root: Path
    calib: Path
    val: Path
    ground_truth: Path
    images: int
    cached: bool


@dataclass(frozen=True)
class SampleSpec:
    """What a download must contain to be accepted."""

    url: str = URL
    images: int = IMAGES
    content_sha256: str = CONTENT_SHA256


def sample_dir() -> Path:
    return cache_dir() / "data" / NAME


def find_sample(root: Path | None = None) -> Sample | None:
    """The sample already in ``root`` (default: the cache), or None when it is not complete."""
    root = root or sample_dir()
    lists = [root / n for n in ("calib.txt", "val.txt", "ground_truth.tsv")]
    if not all(p.is_file() for p in lists) or not (root / "images").is_dir():
        return None
    count = sum(1 for _ in (root / "images").glob("*.JPEG"))
    return Sample(root, *lists, images=count, cached=True)


def fetch_sample(
    *,
    url: str | None = None,
    dest: Path | None = None,
    force: bool = False,
    timeout: float = 30.0,
    progress: bool = True,
    spec: SampleSpec | None = None,
) -> Sample:
    """Return the ImageNet sample, downloading and checking it if it is not there yet.

    ``url``: a mirror of the same archive. Raises :class:`FetchError` with a one-line message.
    """
    spec = spec or SampleSpec()
    dest = Path(dest) if dest is not None else sample_dir()
    src = url or spec.url
    if not force and (have := find_sample(dest)) is not None:
        return have
    hint = (
        "if you are offline, pass your own images instead "
        "(--images DIR_OR_LIST --labels gt.tsv --calib-images LIST)"
    )
    part = part_file(dest.parent / f"{NAME}.zip", force)
    try:
        download(src, part, NAME, None, timeout=timeout, progress=progress)
    except _NetError as e:
        raise FetchError(f"cannot download {NAME} from {src}: {e}; {hint}") from None
    except _Invalid as e:
        part.unlink(missing_ok=True)
        raise FetchError(str(e)) from None
    try:
        count = _install(part, dest, spec, src, progress)
    except _Invalid as e:
        part.unlink(missing_ok=True)
        raise FetchError(str(e)) from None
    except OSError as e:
        raise FetchError(f"cannot write {dest}: {_one_line(e)}") from e
    part.unlink(missing_ok=True)
    found = find_sample(dest)
    assert found is not None
    return Sample(found.root, found.calib, found.val, found.ground_truth, count, cached=False)


def _install(archive: Path, dest: Path, spec: SampleSpec, src: str, progress: bool) -> int:
    """Check the archive, extract its images and write the lists; atomic for ``dest``."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise _Invalid(f"{src} is not a zip archive ({_one_line(e)})") from None
    wnids = {w: i for i, w in enumerate(imagenet_wnids())}
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        with zf:
            entries: dict[str, zipfile.ZipInfo] = {}
            for info in zf.infolist():
                base = info.filename.rsplit("/", 1)[-1]
                if info.is_dir() or not _IMAGE.match(base):
                    continue  # README, gallery, folders: not ours to extract
                if base in entries:
                    raise _Invalid(f"{src}: {base} appears twice in the archive")
                if info.file_size > _MAX_IMAGE_BYTES:
                    raise _Invalid(f"{src}: {base} is {info.file_size} bytes, too large")
                entries[base] = info
            if len(entries) != spec.images:
                raise _Invalid(
                    f"{src} holds {len(entries)} ImageNet images, expected {spec.images}"
                )
            (tmp / "images").mkdir()
            lines = []
            with Bar(f"checking {NAME}", len(entries), progress, unit="images") as bar:
                for base in sorted(entries):
                    try:
                        data = zf.read(entries[base])
                    except (zipfile.BadZipFile, OSError, ValueError) as e:
                        raise _Invalid(f"{src}: cannot read {base} ({_one_line(e)})") from None
                    (tmp / "images" / base).write_bytes(data)
                    lines.append(f"{base} {hashlib.sha256(data).hexdigest()}")
                    bar.advance(1)
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        if digest != spec.content_sha256:
            raise _Invalid(
                f"{src}: the images are not the expected sample "
                f"(content sha256 {digest}, expected {spec.content_sha256})"
            )
        names = sorted(entries)
        gt = []
        for n in names:
            wnid = n.split("_", 1)[0]
            if wnid not in wnids:
                raise _Invalid(f"{src}: {n} is not an ImageNet-1k class")
            gt.append(f"images/{n}\t{wnids[wnid]}")
        rel = [f"images/{n}" for n in names]
        (tmp / "ground_truth.tsv").write_text("file\tindex\n" + "\n".join(gt) + "\n")
        calib = [r for i, r in enumerate(rel) if i % CALIB_EVERY == 0]
        val = [r for i, r in enumerate(rel) if i % CALIB_EVERY != 0]
        (tmp / "calib.txt").write_text("\n".join(calib) + "\n")
        (tmp / "val.txt").write_text("\n".join(val) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return len(names)
