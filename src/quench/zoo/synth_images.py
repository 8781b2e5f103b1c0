"""Deterministic synthetic calibration images, for INT8 builds when no real photos are at hand.

How they are made (version 1): image ``i`` comes from ``numpy.random.default_rng((SEED, i))``
(PCG64, the same stream on every platform), so image ``i`` is the same whatever count is asked:

- R, G and B are each 1/f^s noise: random phases, amplitude falling as frequency^-s, with the
  slope ``s`` drawn from 0.75..1.5 (photos are near 1: edges at every scale; lower is finer
  texture, higher smoother), then mixed through a random 3x3 matrix (0.3 on the diagonal plus
  0.2..0.6 everywhere, rows summing to 1) so the channels correlate as in photos;
- rescaled to a random brightness (mean 90..160) and contrast (std 40..70) in 0..255 units;
- clipped, rounded and saved as 320x256 JPEG files (quality 90, decoded like any photo):
  ``synthetic-0000.jpg``, ``synthetic-0001.jpg``, ...

An INT8 build calibrated on them runs the same kernels as one calibrated on photos (the ranges
change values, not work), so its speed stands; its accuracy on photos is unknown and never
reported. The folder
holds ``SYNTHETIC.txt`` (this text), by which :mod:`quench.builder.calibration` labels them as
synthetic wherever they are used. They are written once into
``<cache>/data/synthetic-calibration-v1/`` (each file atomically) and reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from quench.errors import QuenchError
from quench.progress import Bar
from quench.zoo.fetch import _one_line, cache_dir

VERSION = 1
SEED = 20261202
WIDTH, HEIGHT = 320, 256
SLOPES = (0.75, 1.5)  # amplitude ~ frequency ** -slope, slope drawn from this range
MARKER = "SYNTHETIC.txt"
_NAME = "synthetic-{:04d}.jpg"


def folder() -> Path:
    """Where the synthetic calibration images live: ``<cache>/data/synthetic-calibration-v1``."""
    return cache_dir() / "data" / f"synthetic-calibration-v{VERSION}"


def is_synthetic(path: str | Path) -> bool:
    """Whether ``path`` (a folder, a list file or an image) is in a synthetic-image folder."""
    p = Path(path)
    return (p if p.is_dir() else p.parent).joinpath(MARKER).is_file()


def synthetic_image(index: int) -> np.ndarray:
    """Image ``index``: uint8 (HEIGHT, WIDTH, 3), RGB (see the module docstring)."""
    rng = np.random.default_rng((SEED, index))
    slope = rng.uniform(*SLOPES)
    fy = np.fft.fftfreq(HEIGHT)[:, None]
    fx = np.fft.rfftfreq(WIDTH)[None, :]
    amplitude = np.maximum(np.hypot(fy, fx), 1.0 / max(WIDTH, HEIGHT)) ** -slope
    amplitude[0, 0] = 0.0  # no DC: brightness is set below
    phases = rng.uniform(0.0, 2 * np.pi, (3, *amplitude.shape))
    channels = np.fft.irfft2(amplitude * np.exp(1j * phases), s=(HEIGHT, WIDTH))
    channels /= channels.std(axis=(1, 2), keepdims=True)
    mix = np.eye(3) * 0.3 + rng.uniform(0.2, 0.6, (3, 3))
    rgb = np.einsum("ij,jhw->hwi", mix / mix.sum(axis=1, keepdims=True), channels)
    rgb = (rgb - rgb.mean()) / rgb.std()
    rgb = rgb * rng.uniform(40.0, 70.0) + rng.uniform(90.0, 160.0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def synthetic_images(count: int, progress: bool = True, root: Path | None = None) -> Path:
    """The folder holding at least images ``0 .. count - 1`` (made where missing)."""
    root = root or folder()
    todo = [i for i in range(count) if not (root / _NAME.format(i)).is_file()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        marker = root / MARKER
        text = (__doc__ or "").strip() + "\n"
        if not marker.is_file() or marker.read_text(encoding="utf-8") != text:
            marker.write_text(text, encoding="utf-8")
        with Bar("making synthetic calibration images", len(todo), enabled=progress) as bar:
            for i in todo:
                path = root / _NAME.format(i)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                Image.fromarray(synthetic_image(i), "RGB").save(tmp, format="JPEG", quality=90)
                os.replace(tmp, path)
                bar.advance()
    except OSError as exc:
        raise QuenchError(
            f"cannot write synthetic calibration images to {root}: {_one_line(exc)}"
        ) from None
    return root
