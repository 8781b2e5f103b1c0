"""Calibration images, read through the model's own preprocessing; bad files reported, skipped."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quench.errors import ImageError, QuenchError
from quench.evaluate import list_images
from quench.imaging import Normalizer, load_pixels
from quench.presets import DataConfig
from quench.progress import Bar
from quench.zoo.synth_images import is_synthetic

HOLDOUT_EVERY = 5  # one readable image in five is held out of calibration


@dataclass
class CalibrationSet:
    tensor: np.ndarray  # preprocessed images [N, *input_shape], float32
    files: list[str]
    skipped: list[str] = field(default_factory=list)  # one-line reasons
    digest: str = ""  # sha256 over the preprocessed tensor: keys the calibration cache
    # images read from the same list but never calibrated on: the build's fidelity check
    held_out: np.ndarray | None = None
    held_out_files: list[str] = field(default_factory=list)
    synthetic: bool = False  # made by quench.zoo.synth_images, not photos
    # the same images as uint8 (N, crop, crop, 3) RGB pixels: what a --input uint8 engine takes
    pixels: np.ndarray | None = None
    held_out_pixels: np.ndarray | None = None

    @property
    def kind(self) -> str:
        """What the images are, for messages and the manifest."""
        return "synthetic calibration images" if self.synthetic else "calibration images"

    def describe(self) -> dict[str, object]:
        return {
            "images": len(self.files),
            "held_out": len(self.held_out_files),
            "skipped": len(self.skipped),
            "sha256": self.digest,
            **({"synthetic": True} if self.synthetic else {}),
        }


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
    """The first ``count`` readable images of ``spec`` (a folder, a list file or paths) to
    calibrate on, and held out of them every fifth readable image (``HOLDOUT_EVERY``), up to
    ``count // 4``, for the fidelity check: 200 asked of a 200-image list calibrate on 160 and
    hold out 40; of a longer list, on 200 with 50 held out."""
    if count < 1:
        raise QuenchError(f"--calib-count must be >= 1, got {count}")
    paths = resolve_images(spec)
    if not paths:
        raise QuenchError(f"{spec}: no calibration images")
    norm = Normalizer(data)
    pixels: list[np.ndarray] = []
    files: list[str] = []
    held: list[np.ndarray] = []
    held_files: list[str] = []
    skipped: list[str] = []
    want_held = count // (HOLDOUT_EVERY - 1)
    total = min(count + want_held, len(paths))
    with Bar("reading calibration images", total, enabled=progress) as bar:
        for p in paths:
            if len(pixels) == count and len(held) >= want_held:
                break
            try:
                image = load_pixels(p, data)
            except ImageError as exc:
                skipped.append(str(exc))
                if warn:
                    warn(f"calibration: skipped {exc}")
                continue
            bar.advance()
            read = len(pixels) + len(held)
            if (read % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 and len(held) < want_held) or len(
                pixels
            ) == count:
                held.append(image)
                held_files.append(str(p))
            else:
                pixels.append(image)
                files.append(str(p))
    if not pixels:
        raise QuenchError(f"{spec}: none of the {len(paths)} calibration images could be read")
    if len(pixels) < count and warn:
        warn(
            f"calibration: {len(pixels)} usable images ({len(held)} more held out for the "
            f"fidelity check), fewer than the {count} asked for"
        )
    tensor = norm.batch(pixels)
    digest = hashlib.sha256(tensor.tobytes()).hexdigest()
    held_out = norm.batch(held) if held else None
    synthetic = isinstance(spec, str | Path) and is_synthetic(spec)
    return CalibrationSet(
        tensor,
        files,
        skipped,
        digest,
        held_out,
        held_files,
        synthetic,
        np.stack(pixels),
        np.stack(held) if held else None,
    )
