"""Image decoding and preprocessing, checked against an independent numpy reference."""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

import quench.imaging as imaging
from quench.errors import ImageError
from quench.imaging import Normalizer, crop_origin, load_pixels, resized_size
from quench.presets import DataConfig

# --------------------------------------------------------------------------------------------
# Independent reference: Pillow-style antialiased bilinear resampling (float64) + centre crop.
#
# Pillow (Resample.c) uses the triangle filter with support 1, scaled by the downscale factor
# (never below 1, so upscaling is plain bilinear); each output sample's window is
# [trunc(center - support + 0.5), trunc(center + support + 0.5)) clipped to the image, and its
# weights are normalised to sum 1. Horizontal pass first, then vertical. Pillow works in 8-bit
# fixed point and rounds to uint8 between the passes; this reference keeps float64 throughout
# and rounds once at the end. All bilinear weights are >= 0 and sum to 1, so the intermediate
# rounding moves a result by < 0.5 before the final rounding: at most 1 level apart.
# --------------------------------------------------------------------------------------------

MAX_ABS_TOL = 1  # levels: Pillow's intermediate 8-bit rounding vs float64 (see above)
MEAN_ABS_TOL = 0.3  # levels: observed ~0.2 on noisy images, 0 where no resampling happens


def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output sample: source indices (out, k) and normalised weights (out, k)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale  # bilinear (triangle) support is 1
    ksize = math.ceil(support) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    idx = xmin[:, None] + np.arange(ksize)[None, :]
    w = np.clip(1.0 - np.abs((idx - center[:, None] + 0.5) / filterscale), 0.0, None)
    w = np.where(idx < xmax[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    return np.minimum(idx, in_size - 1), w


def ref_resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float64 (h, w, 3) resized to size=(width, height): horizontal pass, then vertical."""
    out_w, out_h = size
    a = rgb.astype(np.float64)
    if out_w != a.shape[1]:
        idx, w = _coefficients(a.shape[1], out_w)
        a = np.einsum("hokc,ok->hoc", a[:, idx, :], w)
    if out_h != a.shape[0]:
        idx, w = _coefficients(a.shape[0], out_h)
        a = np.einsum("okwc,ok->owc", a[idx], w)
    return a


def ref_pixels(rgb: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """Reference preprocessing: shorter side -> resize (long side rounded), centre crop."""
    h, w = rgb.shape[:2]
    if w <= h:
        new_w, new_h = resize, math.floor(resize * h / w + 0.5)
    else:
        new_w, new_h = math.floor(resize * w / h + 0.5), resize
    out = ref_resize(rgb, (new_w, new_h))
    # torchvision center_crop: int(round((size - crop) / 2.0)) (Python's round)
    top, left = round((new_h - crop) / 2.0), round((new_w - crop) / 2.0)
    out = out[top : top + crop, left : left + crop]
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def noisy(w: int, h: int, seed: int) -> np.ndarray:
    """Gradients plus strong noise: any misplaced sample or wrong weight shows up."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), np.full(xx.shape, 100.0)], -1
    )
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def smooth(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack(
        [xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(w + h, 1)],
        -1,
    ).astype(np.uint8)


def save(arr: np.ndarray, path: Path, **kw: object) -> Path:
    Image.fromarray(arr).save(path, **kw)
    return path


def assert_close(got: np.ndarray, exp: np.ndarray, max_tol: float, mean_tol: float) -> None:
    assert got.shape == exp.shape
    d = np.abs(got.astype(np.int32) - exp.astype(np.int32))
    assert d.max() <= max_tol, f"max abs diff {d.max()} > {max_tol}"
    assert d.mean() < mean_tol, f"mean abs diff {d.mean():.3f} >= {mean_tol}"


CONFIGS = [(36, 32), (64, 56), (256, 224)]


def _sizes(resize: int) -> list[tuple[int, int]]:
    return [
        (48, 40),  # landscape, small
        (11, 17),  # portrait, upscaled; long side 55.6 -> 56 (rounds, not truncates)
        (17, 11),  # landscape, upscaled
        (resize, resize),  # exactly the resize size: no resampling at all
        (resize + 1, resize),  # only one axis resampled; crop origin (rw - crop) / 2 = x.5
        (resize, resize + 17),  # portrait, width already right
        (3 * resize, resize + 1),  # landscape, strong horizontal downscale
        (150, 600),  # tall portrait
        (640, 480),  # typical photo
    ]


@pytest.mark.parametrize(("resize", "crop"), CONFIGS)
def test_load_pixels_matches_reference(tmp_path: Path, resize: int, crop: int) -> None:
    data = DataConfig(resize=resize, crop=crop)
    for i, (w, h) in enumerate(_sizes(resize)):
        arr = noisy(w, h, seed=i)
        got = load_pixels(save(arr, tmp_path / f"{w}x{h}.png"), data)
        assert got.dtype == np.uint8
        assert got.shape == (crop, crop, 3)
        exp = ref_pixels(arr, resize, crop)
        if (w, h) == (resize, resize):
            np.testing.assert_array_equal(got, exp)  # a pure crop
        assert_close(got, exp, MAX_ABS_TOL, MEAN_ABS_TOL)


def test_reference_is_sensitive(tmp_path: Path) -> None:
    """The tolerance is tight enough to catch a wrong filter, rounding rule or crop offset."""
    data = DataConfig(resize=36, crop=32)
    arr = noisy(11, 17, seed=3)
    got = load_pixels(save(arr, tmp_path / "a.png"), data)
    # long side truncated (torchvision int()) instead of rounded: 55 rows instead of 56
    trunc = np.clip(np.floor(ref_resize(arr, (36, 55)) + 0.5), 0, 255)[12:44, 2:34]
    assert np.abs(got.astype(int) - trunc.astype(int)).mean() > 1.0
    # bicubic instead of bilinear
    bicubic = np.asarray(Image.fromarray(arr).resize((36, 56), Image.Resampling.BICUBIC))
    assert np.abs(got.astype(int) - bicubic[12:44, 2:34].astype(int)).max() > 1


def test_resize_and_crop_rules() -> None:
    assert resized_size(48, 40, 36) == (43, 36)  # 43.2 -> 43
    assert resized_size(40, 48, 36) == (36, 43)
    assert resized_size(11, 17, 36) == (36, 56)  # 55.64 -> 56 (nearest)
    assert resized_size(17, 11, 36) == (56, 36)
    assert resized_size(7, 5, 256) == (358, 256)  # 358.4 -> 358
    assert resized_size(40, 40, 36) == (36, 36)
    assert resized_size(1, 1, 36) == (36, 36)
    assert resized_size(10000, 10, 36) == (36000, 36)
    assert resized_size(36, 36, 36) == (36, 36)
    # torchvision crop origin: Python round (half to even)
    assert crop_origin(36, 36, 32) == (2, 2)
    assert crop_origin(37, 36, 32) == (2, 2)  # 2.5 -> 2
    assert crop_origin(39, 36, 32) == (4, 2)  # 3.5 -> 4
    assert crop_origin(36, 43, 32) == (2, 6)  # 5.5 -> 6
    assert crop_origin(36, 56, 32) == (2, 12)
    assert crop_origin(256, 341, 224) == (16, 58)  # 58.5 -> 58


# -- elongated images: only the crop window is resampled ---------------------------------------


def _record_resizes(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    calls: list[dict[str, object]] = []
    orig = Image.Image.resize

    def spy(self: Image.Image, size: tuple[int, int], *args: object, **kw: object) -> Image.Image:
        calls.append({"size": tuple(size), "box": kw.get("box")})
        return orig(self, size, *args, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return calls


def _full_resize_then_crop(arr: np.ndarray, data: DataConfig) -> np.ndarray:
    im = Image.fromarray(arr)
    rw, rh = resized_size(im.width, im.height, data.resize)
    left, top = crop_origin(rw, rh, data.crop)
    full = im.resize((rw, rh), Image.Resampling.BILINEAR)
    return np.asarray(full.crop((left, top, left + data.crop, top + data.crop)))


@pytest.mark.parametrize("size", [(4000, 10), (10, 4000), (10000, 10)])
def test_elongated_box_path_matches_full_resize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple[int, int]
) -> None:
    data = DataConfig(resize=36, crop=32)
    arr = noisy(*size, seed=7)
    path = save(arr, tmp_path / "long.png")
    calls = _record_resizes(monkeypatch)
    got = load_pixels(path, data)
    assert len(calls) == 1
    assert calls[0]["size"] == (32, 32) and calls[0]["box"] is not None  # the box path ran
    monkeypatch.undo()
    full = _full_resize_then_crop(arr, data)
    assert_close(got, full, 1, 0.5)
    if size != (10000, 10):
        assert_close(got, ref_pixels(arr, 36, 32), 1, MEAN_ABS_TOL)


def test_elongated_jpeg_10000x10(tmp_path: Path) -> None:
    data = DataConfig(resize=36, crop=32)
    arr = smooth(10000, 10)
    path = save(arr, tmp_path / "long.jpg", quality=95)
    decoded = np.asarray(Image.open(path).convert("RGB"))
    assert_close(load_pixels(path, data), _full_resize_then_crop(decoded, data), 1, 0.5)


def test_branch_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Box path only when the full resize exceeds 16 * resize**2 pixels."""
    data = DataConfig(resize=36, crop=32)
    calls = _record_resizes(monkeypatch)
    # 160x10 -> 576x36 = 20736 = 16 * 36**2: full resize then crop
    load_pixels(save(noisy(160, 10, 1), tmp_path / "a.png"), data)
    assert calls == [{"size": (576, 36), "box": None}]
    calls.clear()
    # 161x10 -> 580x36 > 16 * 36**2: only the crop window
    arr = noisy(161, 10, 2)
    got = load_pixels(save(arr, tmp_path / "b.png"), data)
    assert len(calls) == 1 and calls[0]["size"] == (32, 32)
    box = calls[0]["box"]
    assert box == pytest.approx((274 * 161 / 580, 2 * 10 / 36, 306 * 161 / 580, 34 * 10 / 36))
    monkeypatch.undo()
    assert_close(got, ref_pixels(arr, 36, 32), 1, MEAN_ABS_TOL)


# -- modes and formats --------------------------------------------------------------------------

DATA = DataConfig(resize=36, crop=32)


def _uniform(got: np.ndarray, rgb: tuple[int, int, int], tol: int = 0) -> None:
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    d = np.abs(got.astype(int) - np.asarray(rgb)[None, None, :])
    assert d.max() <= tol, f"got {got[0, 0].tolist()} .. expected {rgb}"


def _make_mode_image(mode: str, path: Path) -> tuple[Path, tuple[int, int, int], int]:
    """An image of one colour in ``mode``; returns path, the expected RGB and the tolerance."""
    size = (40, 48)
    if mode == "L":
        Image.new("L", size, 77).save(path)
        return path, (77, 77, 77), 0
    if mode == "LA":
        Image.new("LA", size, (90, 10)).save(path)
        return path, (90, 90, 90), 0
    if mode == "RGBA":
        Image.new("RGBA", size, (10, 200, 30, 0)).save(path)  # alpha dropped, not composited
        return path, (10, 200, 30), 0
    if mode in ("P", "P-transparency"):
        im = Image.new("P", size, 3)
        palette = [0] * 768
        palette[9:12] = [200, 40, 7]
        palette[3:6] = [1, 2, 3]
        im.putpalette(palette)
        im.paste(1, (0, 0, 4, 4))  # a corner in the transparent index, outside the crop window
        if mode == "P":
            im.save(path)
        else:
            im.save(path, transparency=b"\xff\x00\xff\x80")  # per-entry alpha (tRNS bytes)
        return path, (200, 40, 7), 0
    if mode == "CMYK":
        Image.new("CMYK", size, (0, 255, 255, 0)).save(path, quality=95)
        return path, (255, 0, 0), 4
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], 128 * 257, np.uint16)).save(path)
        return path, (128, 128, 128), 0
    if mode == "I;16-max":
        Image.fromarray(np.full(size[::-1], 65535, np.uint16)).save(path)
        return path, (255, 255, 255), 0
    if mode == "1":
        Image.new("1", size, 1).save(path)
        return path, (255, 255, 255), 0
    raise AssertionError(mode)


@pytest.mark.parametrize(
    ("mode", "suffix", "opened_mode"),
    [
        ("L", ".png", "L"),
        ("LA", ".png", "LA"),
        ("RGBA", ".png", "RGBA"),
        ("P", ".png", "P"),
        ("P-transparency", ".png", "P"),
        ("CMYK", ".jpg", "CMYK"),
        ("I;16", ".png", "I;16"),
        ("I;16-max", ".png", "I;16"),
        ("1", ".png", "1"),
        ("1", ".bmp", "1"),
        ("L", ".jpg", "L"),
    ],
)
def test_modes_become_rgb(tmp_path: Path, mode: str, suffix: str, opened_mode: str) -> None:
    path, rgb, tol = _make_mode_image(mode, tmp_path / f"img{suffix}")
    with Image.open(path) as im:
        assert im.mode == opened_mode  # the file really is in that mode
        if mode == "P-transparency":
            assert isinstance(im.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's palette-transparency warning
        img = imaging.open_image(path)
    assert img.mode == "RGB"
    _uniform(load_pixels(path, DATA), rgb, tol)


def test_sixteen_bit_gradient_scaled_not_clipped(tmp_path: Path) -> None:
    arr16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    path = tmp_path / "g16.png"
    Image.fromarray(arr16).save(path)
    img = np.asarray(imaging.open_image(path))
    exp = np.clip(arr16 * (255.0 / 65535.0) + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(img[..., 0], exp)
    np.testing.assert_array_equal(img[..., 1], exp)


@pytest.mark.parametrize(
    ("fmt", "kw", "max_tol", "mean_tol"),
    [
        ("BMP", {}, 0, 0.01),
        ("WEBP", {"lossless": True}, 0, 0.01),
        ("WEBP", {"quality": 95}, 12, 2.0),
        ("JPEG", {"quality": 95}, 12, 2.0),
        ("PNG", {}, 0, 0.01),
    ],
)
def test_formats(tmp_path: Path, fmt: str, kw: dict[str, object], max_tol: int, mean_tol: float):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    arr = smooth(60, 45)
    path = save(arr, tmp_path / f"img.{fmt.lower()}", format=fmt, **kw)
    with Image.open(path) as im:
        assert im.format == fmt
    assert_close(load_pixels(path, DATA), ref_pixels(arr, 36, 32), max_tol + 1, mean_tol + 0.3)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    arr = np.zeros((40, 60, 3), np.uint8)  # 60 wide, 40 high
    arr[:20, :30] = (255, 0, 0)  # top-left red
    arr[:20, 30:] = (0, 255, 0)  # top-right green
    arr[20:, :30] = (0, 0, 255)  # bottom-left blue
    arr[20:, 30:] = (255, 255, 255)  # bottom-right white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(arr, tmp_path / "rot.jpg", quality=95, exif=exif)
    with Image.open(path) as im:
        assert im.getexif()[0x0112] == 6 and im.size == (60, 40)
        decoded = np.asarray(im.convert("RGB"))  # as stored, orientation not applied
    got = load_pixels(path, DATA)
    rotated = np.rot90(decoded, k=-1)  # clockwise: now 40 wide, 60 high
    assert_close(got, ref_pixels(rotated, 36, 32), MAX_ABS_TOL, MEAN_ABS_TOL)
    assert np.abs(got.astype(int) - ref_pixels(decoded, 36, 32).astype(int)).mean() > 50
    # displayed: top-left blue, top-right red, bottom-left white, bottom-right green
    for (y, x), colour in {
        (0, 0): (0, 0, 255),
        (0, 31): (255, 0, 0),
        (31, 0): (255, 255, 255),
        (31, 31): (0, 255, 0),
    }.items():
        assert np.abs(got[y, x].astype(int) - colour).max() <= 12, (y, x, got[y, x])


def test_bytes_input(tmp_path: Path) -> None:
    arr = noisy(70, 50, seed=4)
    path = save(arr, tmp_path / "a.jpg", quality=90)
    data = path.read_bytes()
    from_bytes = load_pixels(data, DATA)
    np.testing.assert_array_equal(from_bytes, load_pixels(path, DATA))
    np.testing.assert_array_equal(load_pixels(bytearray(data), DATA), from_bytes)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert_close(from_bytes, ref_pixels(decoded, 36, 32), MAX_ABS_TOL, MEAN_ABS_TOL)
    with pytest.raises(ImageError, match=r"<bytes>: not an image"):
        load_pixels(b"hello, world", DATA)


# -- errors ---------------------------------------------------------------------------------


def _error(source: object) -> str:
    with pytest.raises(ImageError) as info:
        load_pixels(source, DATA)  # type: ignore[arg-type]
    return str(info.value)


def test_errors_name_file_and_reason(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    msg = _error(missing)
    assert str(missing) in msg and "no such file" in msg

    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    msg = _error(folder)
    assert str(folder) in msg and "directory" in msg

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    msg = _error(empty)
    assert str(empty) in msg and "empty" in msg

    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n" * 20)
    msg = _error(text)
    assert str(text) in msg and "not an image" in msg

    good = save(noisy(120, 90, seed=5), tmp_path / "good.jpg", quality=90)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    msg = _error(truncated)
    assert str(truncated) in msg and "truncated" in msg
    assert msg.count("\n") == 0


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions but holds (almost) no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decoding(tmp_path: Path) -> None:
    # just over the limit: our own check (Pillow only warns below 2x its limit)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(10_000, 9_000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        msg = _error(bomb)
    # had it been decoded, the missing pixel data would have been reported as truncated
    assert str(bomb) in msg and "10000x9000" in msg and "pixel limit" in msg
    assert "truncated" not in msg

    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(100_000, 100_000))
    msg = _error(huge)
    assert str(huge) in msg and "too many pixels" in msg


def test_pixel_limit_checked_before_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(noisy(40, 30, seed=1), tmp_path / "small.png")
    assert load_pixels(path, DATA).shape == (32, 32, 3)
    loads: list[object] = []

    def spy(cls: type) -> None:
        orig = cls.load

        def load(self: Image.Image) -> object:
            loads.append(self)
            return orig(self)

        monkeypatch.setattr(cls, "load", load)

    spy(Image.Image)
    spy(ImageFile.ImageFile)
    monkeypatch.setattr(imaging, "MAX_PIXELS", 1199)
    msg = _error(path)
    assert str(path) in msg and "40x30" in msg and "1,199 pixel limit" in msg
    assert loads == []
    monkeypatch.setattr(imaging, "MAX_PIXELS", 1200)
    assert load_pixels(path, DATA).shape == (32, 32, 3)
    assert loads


# -- normalizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_normalizer(layout: str, order: str) -> None:
    mean, std = (120.0, 115.0, 100.0), (60.0, 50.0, 40.0)
    data = DataConfig(resize=36, crop=32, mean=mean, std=std, channel_order=order, layout=layout)
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    norm = Normalizer(data)
    buf = norm.new_batch(3)
    assert buf.shape == (3, *data.input_shape) and buf.dtype == np.float32
    buf[:] = -999.0
    norm(px, buf[1])
    perm = [2, 1, 0] if order == "BGR" else [0, 1, 2]  # mean/std are given in R, G, B order
    exp = (px[..., perm].astype(np.float64) - np.asarray(mean)[perm]) / np.asarray(std)[perm]
    if layout == "NCHW":
        exp = exp.transpose(2, 0, 1)
    np.testing.assert_allclose(buf[1], exp, rtol=0, atol=1e-5)
    assert np.all(buf[0] == -999.0) and np.all(buf[2] == -999.0)  # other slots untouched
    # first channel: R for RGB, B for BGR
    first = buf[1][0] if layout == "NCHW" else buf[1][..., 0]
    c = 2 if order == "BGR" else 0
    np.testing.assert_allclose(first, (px[..., c] - mean[c]) / std[c], atol=1e-5)

    batch = norm.batch([px, px[::-1]])
    np.testing.assert_allclose(batch[0], exp, atol=1e-5)
    np.testing.assert_allclose(batch[1], exp[:, ::-1] if layout == "NCHW" else exp[::-1], atol=1e-5)


# --------------------------------------------------------------------------------------------
# Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (never below 2x the resize
# size), then resized from the crop window. The result stays within these bounds of the
# reference computed on the fully decoded pixels (observed: mean 0.19-0.30, max 2 levels).
# --------------------------------------------------------------------------------------------
DRAFT_MAX_TOL = 3
DRAFT_MEAN_TOL = 0.5


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Photo-like: smooth structures at several scales plus mild sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [
            127 + 100 * np.sin(xx / 23.0) * np.cos(yy / 31.0),
            127 + 100 * np.sin((xx + yy) / 41.0),
            xx * 255 / (w - 1),
        ],
        -1,
    )
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("size", "decoded"),
    [
        ((600, 450), (150, 113)),  # 1/4: shorter side 113 >= 2 x 36
        ((450, 600), (113, 150)),  # portrait
        ((1200, 145), (600, 73)),  # 1/2 only: 1/4 would leave the shorter side under 72
        ((2000, 1500), (250, 188)),  # 1/8, the largest scale libjpeg offers
    ],
)
def test_large_jpeg_decoded_at_reduced_scale(
    tmp_path: Path, size: tuple[int, int], decoded: tuple[int, int]
) -> None:
    arr = photo(*size)
    path = save(arr, tmp_path / "big.jpg", quality=95)
    im, full = imaging._decode(path, DATA.resize)
    assert (im.size, full) == (decoded, size)
    fully_decoded = np.asarray(Image.open(path).convert("RGB"))
    got = load_pixels(path, DATA)
    assert_close(got, ref_pixels(fully_decoded, 36, 32), DRAFT_MAX_TOL, DRAFT_MEAN_TOL)
    # sensitive: a crop window off by 2 output pixels is far outside the tolerance
    shifted = ref_pixels(np.roll(fully_decoded, 2 * max(size) // 36, axis=1), 36, 32)
    assert np.abs(shifted.astype(int) - got.astype(int)).mean() > 4 * DRAFT_MEAN_TOL


def test_small_jpeg_and_large_png_decoded_in_full(tmp_path: Path) -> None:
    under = save(photo(140, 143), tmp_path / "under.jpg", quality=95)  # shorter side < 4 x 36
    png = save(photo(600, 450), tmp_path / "big.png")
    for path in (under, png):
        im, full = imaging._decode(path, DATA.resize)
        assert im.size == full
    arr = photo(600, 450)
    np.testing.assert_array_equal(
        load_pixels(png, DATA), imaging.resize_crop(Image.fromarray(arr), DATA)
    )


def test_large_jpeg_with_exif_rotation(tmp_path: Path) -> None:
    arr = photo(600, 400)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(arr, tmp_path / "rot.jpg", quality=95, exif=exif)
    im, full = imaging._decode(path, DATA.resize)
    assert full == (400, 600) and im.size == (100, 150)
    with Image.open(path) as stored:
        rotated = np.rot90(np.asarray(stored.convert("RGB")), k=-1)
    assert_close(
        load_pixels(path, DATA), ref_pixels(rotated, 36, 32), DRAFT_MAX_TOL, DRAFT_MEAN_TOL
    )


def test_over_twice_the_limit_cites_quenchs_limit(tmp_path: Path) -> None:
    """Pillow refuses these itself, citing its own (2x) limit: the message gives Quench's."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(100_000, 100_000))
    msg = _error(huge)
    assert f"over the {imaging.MAX_PIXELS:,} pixel limit" in msg
    assert "10,000,000,000 pixels" in msg
    assert "178956970" not in msg and "178,956,970" not in msg


def test_fifo_is_refused_without_opening_it(tmp_path: Path) -> None:
    """open() on a FIFO blocks until a writer comes: it must never be opened."""
    import os
    import threading

    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    result: list[str] = []
    worker = threading.Thread(target=lambda: result.append(_error(fifo)), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # blocked in open(): let it go, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("decoding a FIFO blocked")
    assert result == [f"{fifo}: not a regular file (a FIFO)"]


def test_device_is_not_an_empty_file() -> None:
    assert _error(Path("/dev/zero")) == "/dev/zero: not a regular file (a character device)"
    assert _error(Path("/dev/null")) == "/dev/null: not a regular file (a character device)"
