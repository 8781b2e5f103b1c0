"""Download preset models into the cache: resumable, verified, never left half-written.

A download streams into ``<dest>.part`` (resumed with an HTTP ``Range`` request when a previous
attempt left one behind), is checked (size, sha256, ONNX validity, tensor names) and only then
moved to ``<dest>`` with :func:`os.replace`. The file's sha256 is recorded next to it in
``<dest>.sha256`` so later calls can trust the cached copy without the network.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from quench.errors import FetchError
from quench.graph import real_inputs
from quench.presets import Preset, get_preset
from quench.progress import Bar

CHUNK = 1 << 20
_USER_AGENT = "quench/0.1 (+model download)"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class FetchResult:
    """Where a model ended up and what it is."""

    path: Path
    sha256: str
    size: int
    url: str | None
    cached: bool  # True when no download was needed


class _Invalid(Exception):
    """The downloaded bytes are not the expected model (the .part is discarded)."""


class _NetError(Exception):
    """The transfer failed; ``retry`` is set when resuming once might help."""

    def __init__(self, reason: str, *, retry: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry


def cache_dir() -> Path:
    """``$QUENCH_CACHE``, else ``$XDG_CACHE_HOME/quench``, else ``~/.cache/quench``."""
    if env := os.environ.get("QUENCH_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "quench"
    return Path.home() / ".cache" / "quench"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def fetch_model(
    name_or_preset: str | Preset,
    *,
    url: str | None = None,
    dest: Path | None = None,
    force: bool = False,
    timeout: float = 30.0,
    progress: bool = True,
) -> FetchResult:
    """Return a verified local copy of a preset's model, downloading it if needed.

    ``url`` overrides the preset's URL (a mirror); ``dest`` defaults to
    ``<cache>/models/<name>.onnx``. Raises :class:`FetchError` with a one-line message.
    """
    preset = get_preset(name_or_preset) if isinstance(name_or_preset, str) else name_or_preset
    dest = Path(dest) if dest is not None else cache_dir() / "models" / f"{preset.name}.onnx"
    src = url or preset.url
    hint = f"pass --model PATH (or put it at {dest})"

    if not force and (sha := _cached_sha(dest, preset)) is not None:
        return FetchResult(dest, sha, dest.stat().st_size, src, cached=True)
    if not src:
        raise FetchError(
            f"preset {preset.name} has no download URL; download the model yourself and {hint}"
        )

    part = part_file(dest, force)
    try:
        download(src, part, preset.name, preset.size, timeout=timeout, progress=progress)
        sha = _verify(part, preset, src)
    except _Invalid as e:
        part.unlink(missing_ok=True)
        raise FetchError(str(e)) from None
    except _NetError as e:
        raise FetchError(
            f"cannot download {preset.name} from {src}: {e}. "
            f"If you are offline, download it elsewhere and {hint}"
        ) from None

    sidecar = _sidecar(dest)
    try:
        sidecar.unlink(missing_ok=True)
        os.replace(part, dest)
        _write_sidecar(dest, sha)
    except OSError as e:
        raise FetchError(f"cannot write {dest}: {_one_line(e)}") from e
    return FetchResult(dest, sha, dest.stat().st_size, src, cached=False)


# -- cache -------------------------------------------------------------------------------------


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _write_sidecar(dest: Path, sha: str) -> None:
    sidecar = _sidecar(dest)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(f"{sha}  {dest.name}\n", encoding="utf-8")
    os.replace(tmp, sidecar)


def _cached_sha(dest: Path, preset: Preset) -> str | None:
    """The sha256 of ``dest`` if it is a usable copy of the model, else ``None``.

    With a sidecar the file must hash to the recorded value; a file without one (put there by
    the user) gets the full check and, if it passes, a sidecar.
    """
    try:
        if not dest.is_file() or (preset.size is not None and dest.stat().st_size != preset.size):
            return None
        sidecar = _sidecar(dest)
        if sidecar.is_file():
            recorded = sidecar.read_text(encoding="utf-8").split()
            sha = sha256_file(dest)
            return sha if recorded and recorded[0].lower() == sha else None
        try:
            sha = _verify(dest, preset, str(dest))
        except _Invalid:
            return None
        _write_sidecar(dest, sha)
        return sha
    except OSError:
        return None


# -- download ----------------------------------------------------------------------------------


def part_file(dest: Path, force: bool) -> Path:
    """``<dest>.part``, its folder made (and the file removed when ``force``)."""
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if force:
            part.unlink(missing_ok=True)
    except OSError as e:
        raise FetchError(f"cannot write to {dest.parent}: {_one_line(e)}") from e
    return part


def download(
    url: str, part: Path, name: str, size: int | None, *, timeout: float, progress: bool
) -> None:
    """Fill ``part`` with the whole file (``size`` bytes when known), resuming what is there;
    at most one retry. Raises ``_NetError`` (the network) or ``_Invalid`` (the bytes)."""
    opener = urllib.request.build_opener()  # reads proxy settings from the environment now
    for attempt in range(2):
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset >= size:
            if offset == size:
                return  # a previous run got everything; verification decides
            part.unlink()
            offset = 0
        try:
            _transfer(opener, url, part, offset, name, size, timeout=timeout, progress=progress)
            return
        except _NetError as e:
            if not e.retry or attempt:
                raise


def _transfer(
    opener: urllib.request.OpenerDirector,
    url: str,
    part: Path,
    offset: int,
    name: str,
    size: int | None,
    *,
    timeout: float,
    progress: bool,
) -> None:
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # our .part is not a prefix the server recognises
            part.unlink(missing_ok=True)
            raise _NetError(f"HTTP {e.code} {e.reason}", retry=True) from None
        raise _NetError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _NetError(_reason(e.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _NetError(_reason(e)) from None

    with resp:
        length = _int(resp.headers.get("Content-Length"))
        if offset and resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _NetError("server answered the resume request with a bad range", retry=True)
            total = _int(m.group(3)) or (offset + length if length is not None else None)
        else:
            offset = 0  # 200: the server sends the whole file, start over
            total = length
        if total is not None and size is not None and total != size:
            raise _Invalid(f"{url} is {total} bytes, expected {size}")

        done = offset
        with (
            part.open("ab" if offset else "wb") as f,
            Bar(f"downloading {name}", total, progress, unit="bytes") as bar,
        ):
            bar.advance(offset)
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except TimeoutError:
                    raise _NetError(f"timed out after {done} of {total or '?'} bytes") from None
                except (OSError, http.client.HTTPException) as e:
                    raise _NetError(_reason(e), retry=True) from None
                if not chunk:
                    break
                f.write(chunk)
                done += len(chunk)
                bar.advance(len(chunk))
                if size is not None and done > size:
                    raise _Invalid(f"downloaded more than {size} bytes from {url}")
        if total is not None and done < total:
            raise _NetError(f"connection closed after {done} of {total} bytes", retry=True)


# -- verification ------------------------------------------------------------------------------


def _verify(path: Path, preset: Preset, source: str) -> str:
    """Check size, sha256, ONNX validity and tensor names; return the sha256 or raise _Invalid."""
    size = path.stat().st_size
    if preset.size is not None and size != preset.size:
        raise _Invalid(f"downloaded {size} bytes from {source}, expected {preset.size}")
    sha = sha256_file(path)
    if preset.sha256 and sha != preset.sha256.lower():
        raise _Invalid(f"sha256 of {source} is {sha}, expected {preset.sha256.lower()}")

    import onnx

    try:
        onnx.checker.check_model(str(path))  # path-based: works for models over 2 GB
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise _Invalid(f"{source} is not a valid ONNX model: {_one_line(e)}") from None
    for kind, want, have in (
        ("input", preset.input_name, [v.name for v in real_inputs(model)]),
        ("output", preset.output_name, [v.name for v in model.graph.output]),
    ):
        if want and want not in have:
            listed = ", ".join(have[:5]) + (", ..." if len(have) > 5 else "")
            raise _Invalid(
                f"{source} is not {preset.name}: it has no {kind} named {want!r} "
                f"({kind}s: {listed or 'none'})"
            )
    return sha


# -- helpers -----------------------------------------------------------------------------------


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _reason(err: object) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[:1].lower() + err.strerror[1:]
    return _one_line(err) or type(err).__name__


def _one_line(err: object) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."
