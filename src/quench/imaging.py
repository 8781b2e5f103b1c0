"""Image decoding and preprocessing: file -> RGB -> resize shorter side -> centre crop -> tensor.

The resize + crop follow the reference behind the published accuracy figures: shorter side to
``resize`` with Pillow's antialiasing filter, the long side rounded to the nearest pixel (timm's
``ResizeKeepRatio``; torchvision truncates, which costs efficientnet-lite0 3 images of 800),
then a centred ``crop`` square.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from quench.errors import ImageError
from quench.presets import DataConfig

# Refuse decompression bombs: anything above this many pixels is rejected before decoding.
MAX_PIXELS = 89_478_485  # Pillow's own warning threshold (~ 0.25 GiB of RGB)
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``shorter`` (long side rounded to nearest)."""
    if width <= height:
        return shorter, max(1, round(shorter * height / width))
    return max(1, round(shorter * width / height)), shorter


def crop_origin(width: int, height: int, crop: int) -> tuple[int, int]:
    """Top-left corner of the centred crop (torchvision's rounding)."""
    return round((width - crop) / 2.0), round((height - crop) / 2.0)


def crop_box(width: int, height: int, data: DataConfig) -> tuple[float, float, float, float]:
    """The centre crop, in source-pixel coordinates, of the resized image."""
    rw, rh = resized_size(width, height, data.resize)
    left, top = crop_origin(rw, rh, data.crop)
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + data.crop) * sx, (top + data.crop) * sy)


def open_image(source: str | Path | bytes) -> Image.Image:
    """Open and fully decode an image as RGB, or raise ImageError naming the file and reason."""
    return _decode(source)[0]


def _decode(
    source: str | Path | bytes,
    shorter: int | None = None,
    max_pixels: int | None = None,
    reduce: bool = False,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``source`` as RGB. With ``shorter``, a JPEG whose shorter side is at least 4x
    ``shorter`` is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled
    decoding), never below 2x ``shorter``. Returns the image and the full-resolution size
    (after EXIF orientation) it stands for."""
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(source)
    try:
        if isinstance(source, bytes | bytearray):
            fp: io.IOBase = io.BytesIO(source)
        else:
            _regular_file(source, name)  # a FIFO would block open() forever; /dev/zero never ends
            fp = open(source, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, not an image") from None
    except OSError as exc:
        raise ImageError(f"{name}: cannot open ({exc.strerror or exc})") from None
    with fp:
        try:
            im = Image.open(fp)
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(
                    f"{name}: {im.width}x{im.height} pixels is over the {MAX_PIXELS:,} pixel limit "
                    "(decompression bomb?)"
                )
            full = im.size
            if shorter:
                _draft(im, shorter)
            if max_pixels and im.width * im.height > max_pixels:
                raise ImageError(
                    f"{name}: {im.width}x{im.height} pixels to decode is over this server's "
                    f"limit of {max_pixels:,}"
                )
            im.load()
            if reduce and shorter:
                im = _reduce(im, shorter)
            turned = ImageOps.exif_transpose(im)
            if turned.size != im.size:
                full = full[::-1]
            return _to_rgb(turned), full
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:  # over twice the limit: Pillow refuses
            found = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(found.group(1)):,} pixels " if found else ""
            raise ImageError(
                f"{name}: refused, too many pixels: {size}is over the {MAX_PIXELS:,} pixel limit "
                "(decompression bomb?)"
            ) from None
        except UnidentifiedImageError:
            if fp.seek(0, io.SEEK_END) == 0:
                raise ImageError(f"{name}: empty file") from None
            raise ImageError(f"{name}: not an image (unrecognised format)") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = str(exc) or type(exc).__name__
            if "truncated" in reason or "broken data stream" in reason:
                reason = f"truncated or corrupt image data ({reason})"
            raise ImageError(f"{name}: {reason}") from None


def _regular_file(path: str | Path, name: str) -> None:
    """Refuse anything but a regular file (FIFO, socket, device) before opening it."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(name)
    if not stat.S_ISREG(mode):
        kinds = (
            (stat.S_ISFIFO, "a FIFO"),
            (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"),
        )
        kind = next((k for test, k in kinds if test(mode)), "a special file")
        raise ImageError(f"{name}: not a regular file ({kind})")


def _draft(im: Image.Image, shorter: int) -> None:
    """Ask the JPEG decoder for the smallest 1/2^k scale keeping the shorter side >= 2x
    ``shorter`` (no-op for other formats and for images under 4x ``shorter``)."""
    if im.format == "JPEG" and min(im.size) >= 4 * shorter:
        k = 2 * shorter / min(im.size)
        im.draft(None, (math.ceil(im.width * k), math.ceil(im.height * k)))


_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr"})


def _reduce(im: Image.Image, shorter: int) -> Image.Image:
    """Box-average ``im`` down by the largest integer factor keeping its shorter side >= 2x
    ``shorter`` (no-op under 4x); modes without a meaningful average are converted first."""
    k = min(im.size) // (2 * shorter)
    if k < 2:
        return im
    if im.mode.startswith("I;16"):  # reduce as 32-bit, then scale as 16-bit
        return _gray_to_l(im.convert("I").reduce(k), 65535.0)
    if im.mode not in _REDUCIBLE:
        im = _to_rgb(im)
    return im.reduce(k)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette, 16-bit and alpha images become 8-bit RGB."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = _gray_to_l(im, 65535.0 if im.mode.startswith("I;16") else None)
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def _gray_to_l(im: Image.Image, peak: float | None) -> Image.Image:
    """16/32-bit grayscale -> 8-bit, ``peak`` mapping to 255 (None: 65535 if any value is over
    255, else 255)."""
    arr = np.asarray(im, dtype=np.float32)  # float32 is exact here (v / 257 + 0.5)
    if peak is None:
        peak = 65535.0 if arr.max() > 255 else 255.0
    arr *= 255.0 / peak
    arr += 0.5
    return Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), "L")


def resize_crop(
    im: Image.Image, data: DataConfig, full: tuple[int, int] | None = None
) -> Image.Image:
    """Resize the shorter side to ``data.resize`` and take the centre ``data.crop`` square.

    Exactly the reference (full resize, then crop). Two cases resample only the crop window
    (``resize(box=...)``: same filter, pixels within +-1 of the full resize): very elongated
    images, whose full resize would be huge, and a JPEG decoded at reduced scale, where ``full``
    is the size it stands for and the geometry is worked out at that size.
    """
    resample = _RESAMPLE[data.interpolation]
    if full is not None and full != im.size:
        scale = round(full[0] / im.width)
        box = tuple(v / scale for v in crop_box(*full, data))
        return im.resize((data.crop, data.crop), resample, box=box)
    rw, rh = resized_size(im.width, im.height, data.resize)
    if rw * rh > 16 * data.resize * data.resize:
        box = crop_box(im.width, im.height, data)
        return im.resize((data.crop, data.crop), resample, box=box)
    left, top = crop_origin(rw, rh, data.crop)
    return im.resize((rw, rh), resample).crop((left, top, left + data.crop, top + data.crop))


def load_pixels(
    source: str | Path | bytes,
    data: DataConfig,
    *,
    max_pixels: int | None = None,
    reduce: bool = False,
) -> np.ndarray:
    """Decode and resize/crop one image: uint8 array (crop, crop, 3), RGB.

    Large JPEGs (shorter side >= 4x ``data.resize``) are decoded at reduced scale first.
    ``max_pixels`` bounds the pixels actually decoded (after that reduced-scale decoding);
    ``reduce`` box-averages any other large image down by an integer factor before its
    colour conversion (memory; pixels within +-1 of the reference, like the JPEG case).
    """
    im, full = _decode(source, data.resize, max_pixels, reduce)
    return np.asarray(resize_crop(im, data, full))


class Normalizer:
    """uint8 HWC RGB pixels -> the engine's input, written straight into a batch buffer:
    float32, normalised, in the model's channel order and layout; or, for an engine that takes
    uint8 pixels (``data.input``), the pixels as they are (no float buffer at all)."""

    def __init__(self, data: DataConfig) -> None:
        self.data = data
        self._order = [2, 1, 0] if data.channel_order == "BGR" else None
        mean, std = (np.asarray(v, np.float32) for v in data.channel_mean_std())
        self._scale = 1.0 / std
        self._bias = -mean / std

    def new_batch(self, n: int) -> np.ndarray:
        return np.empty((n, *self.data.input_shape), self.data.input_dtype)

    def __call__(self, pixels: np.ndarray, out: np.ndarray) -> None:
        """Normalise one HWC uint8 image into ``out`` (one image of the batch buffer)."""
        if self.data.pixels:
            out[...] = pixels  # the engine's graph normalises
            return
        if self._order is not None:
            pixels = pixels[..., self._order]
        if self.data.layout == "NCHW":
            for c in range(3):
                np.multiply(pixels[..., c], self._scale[c], out=out[c], casting="unsafe")
                out[c] += self._bias[c]
        else:
            np.multiply(pixels, self._scale, out=out, casting="unsafe")
            out += self._bias

    def batch(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """A new batch of ``images`` (HWC uint8 each, or one (N, H, W, 3) uint8 array)."""
        out = self.new_batch(len(images))
        for i, px in enumerate(images):
            self(px, out[i])
        return out
