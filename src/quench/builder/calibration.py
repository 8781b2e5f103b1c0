"""Calibration images, read through the model's own preprocessing; bad files reported, skipped."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quench.errors import ImageError, QuenchError
from quench.evaluate import list_images
from quench.imaging import Normalizer, load_pixels
from quench.presets import DataConfig
from quench.progress import Bar


@dataclass
class CalibrationSet:
    tensor: np.ndarray  # preprocessed images [N, *input_shape], float32
    files: list[str]
    skipped: list[str] = field(default_factory=list)  # one-line reasons
    digest: str = ""  # sha256 over the preprocessed tensor: keys the calibration cache

    def describe(self) -> dict[str, object]:
        return {"images": len(self.files), "skipped": len(self.skipped), "sha256": self.digest}


def resolve_images(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(spec, str | Path):
        return list_images(spec)
    return [Path(p) for p in spec]


def load_calibration(
    spec: str | Path | Sequence[str | Path],
    data: DataConfig,
    count: int = 200,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> CalibrationSet:
    """The first ``count`` readable images of ``spec`` (a folder, a list file or paths)."""
    if count < 1:
        raise QuenchError(f"--calib-count must be >= 1, got {count}")
    paths = resolve_images(spec)
    if not paths:
        raise QuenchError(f"{spec}: no calibration images")
    norm = Normalizer(data)
    pixels: list[np.ndarray] = []
    files: list[str] = []
    skipped: list[str] = []
    with Bar("reading calibration images", min(count, len(paths)), enabled=progress) as bar:
        for p in paths:
            if len(pixels) == count:
                break
            try:
                pixels.append(load_pixels(p, data))
                files.append(str(p))
                bar.advance()
            except ImageError as exc:
                skipped.append(str(exc))
                if warn:
                    warn(f"calibration: skipped {exc}")
    if not pixels:
        raise QuenchError(f"{spec}: none of the {len(paths)} calibration images could be read")
    if len(pixels) < count and warn:
        warn(f"calibration: {len(pixels)} usable images, fewer than the {count} asked for")
    tensor = norm.batch(pixels)
    digest = hashlib.sha256(tensor.tobytes()).hexdigest()
    return CalibrationSet(tensor, files, skipped, digest)


def cache_key(model_sha256: str, calib_digest: str, settings: dict[str, object]) -> str:
    """What a calibration cache depends on: the model, the preprocessed images, the method."""
    blob = json.dumps([model_sha256, calib_digest, settings], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]
