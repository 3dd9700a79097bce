"""The crop-only JPEG decoder (beit_ray/data/jpeg.py): same pixels as Pillow, falls back cleanly."""

from __future__ import annotations

import io
import logging
import os
import shutil

import numpy as np
import pytest
from conftest import jpeg_bytes
from PIL import Image

from beit_ray.data import jpeg
from beit_ray.data.augment import ClassifyTransform, PretrainTransform, decode_region
from beit_ray.data.jpeg import decode_jpeg_region, native_library, scaled_size


def _encode(img: np.ndarray | Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(img) if isinstance(img, np.ndarray) else img).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _pillow(data: bytes, scale: int = 1) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if scale > 1:
        img.draft("RGB", (img.width // scale, img.height // scale))
    return np.asarray(img.convert("RGB"))


VARIANTS = {
    "q90 4:2:0": dict(quality=90),
    "q75 4:4:4": dict(quality=75, subsampling=0),
    "q95 4:2:2": dict(quality=95, subsampling=1),
    "progressive": dict(quality=85, progressive=True),
    "restart markers": dict(quality=90, restart_marker_blocks=4),
}


HAVE_TOOLCHAIN = (shutil.which("cc") or shutil.which("gcc")) is not None and any(
    os.path.exists(os.path.join(d, "jpeglib.h")) for d in ("/usr/include", "/usr/local/include")
)
pytestmark = pytest.mark.skipif(
    not HAVE_TOOLCHAIN, reason="no C compiler or libjpeg headers (apt install gcc libjpeg-dev)"
)


def test_the_native_decoder_builds_here():
    """With a compiler and libjpeg's headers (CI has both) the fast path must build and load."""
    assert native_library() is not None


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_regions_equal_a_full_pillow_decode(photos, variant):
    rng = np.random.default_rng(0)
    for name in ("astronaut", "coffee", "rocket"):
        data = _encode(photos[name], **VARIANTS[variant])
        full = _pillow(data)  # [H, W, 3]
        h, w = full.shape[:2]
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
            x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
            got = decode_jpeg_region(data, 1, (x0, y0, x1, y1))
            assert got is not None and got.shape == (y1 - y0, x1 - x0, 3)
            assert np.array_equal(got, full[y0:y1, x0:x1]), (name, variant, (x0, y0, x1, y1))
        assert np.array_equal(decode_jpeg_region(data, 1, (0, 0, w, h)), full)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_dct_scaled_regions_equal_pillows_draft(photos, scale):
    data = jpeg_bytes(photos["chelsea"])  # 451 x 300
    drafted = _pillow(data, scale)
    w, h = scaled_size(451, 300, scale)
    assert drafted.shape == (h, w, 3)
    box = (w // 5, h // 4, w - w // 6, h - 1)
    got = decode_jpeg_region(data, scale, box)
    assert np.array_equal(got, drafted[box[1] : box[3], box[0] : box[2]])


def test_any_bytes_like_input(photos):
    data = jpeg_bytes(photos["coffee"])
    want = decode_jpeg_region(data, 1, (5, 6, 70, 80))
    for kind in (bytearray, memoryview, np.bytes_):
        assert np.array_equal(decode_jpeg_region(kind(data), 1, (5, 6, 70, 80)), want)


def test_grayscale_jpeg_comes_out_rgb(photos):
    gray = np.asarray(Image.fromarray(photos["coffee"]).convert("L"))
    data = _encode(gray, quality=90)
    got = decode_jpeg_region(data, 1, (10, 20, 200, 120))
    want = _pillow(data)[20:120, 10:200]
    assert got.shape == (100, 190, 3) and np.array_equal(got, want)


def test_anything_unusual_returns_none_for_pillow_to_handle(photos):
    data = jpeg_bytes(photos["astronaut"])
    assert decode_jpeg_region(data[: len(data) // 2], 1, (0, 0, 10, 10)) is None  # truncated
    assert decode_jpeg_region(data, 1, (0, 0, 10_000, 10)) is None  # box outside the image
    cmyk = _encode(Image.fromarray(photos["astronaut"]).convert("CMYK"), quality=90)
    assert decode_jpeg_region(cmyk, 1, (0, 0, 10, 10)) is None  # Adobe CMYK: Pillow converts
    corrupt = bytearray(data)
    corrupt[len(data) // 3 : len(data) // 3 + 200] = bytes(range(200))  # garbage entropy data
    got = decode_jpeg_region(bytes(corrupt), 1, (0, 0, 512, 512))
    assert got is None  # libjpeg warned (corrupt data): Pillow's path decides what it is
    assert decode_jpeg_region(b"not a jpeg\xff\xd9", 1, (0, 0, 1, 1)) is None


def test_the_transforms_give_the_same_views_with_and_without_it(photos):
    """Region decode is an optimization only: every view is bit-identical to the Pillow path."""
    data = jpeg_bytes(photos["immunohistochemistry"])  # 512 x 512
    kw = dict(color_jitter=0.4, seed=3)
    fast, slow = PretrainTransform(**kw), PretrainTransform(**kw, region_decode=False)
    for k in range(8):
        for a, b in zip(fast(data, f"k{k}", epoch=k), slow(data, f"k{k}", epoch=k), strict=True):
            assert np.array_equal(a, b)
    for train in (True, False):
        f, s = ClassifyTransform(train=train), ClassifyTransform(train=train, region_decode=False)
        assert np.array_equal(f(data, "x"), s(data, "x"))


def test_decode_region_uses_it_only_where_it_applies(photos):
    data = jpeg_bytes(photos["rocket"])

    def box(w, h):
        return 10.4, 20.6, 300.2, 250.9

    arr, b = decode_region(data, box, 224)
    assert isinstance(arr, np.ndarray) and b == (0, 0, arr.shape[1], arr.shape[0])
    assert np.array_equal(arr, _pillow(data)[21:251, 10:300])
    img, b = decode_region(data, box, 224, region=False)
    assert isinstance(img, Image.Image) and b == (10.4, 20.6, 300.2, 250.9)
    # EXIF-rotated and PNG images take Pillow's path
    rotated = Image.fromarray(photos["rocket"])
    exif = rotated.getexif()
    exif[0x0112] = 6
    img, _ = decode_region(_encode(rotated, quality=90, exif=exif), box, 224)
    assert isinstance(img, Image.Image)
    png = io.BytesIO()
    rotated.save(png, format="PNG")
    img, _ = decode_region(png.getvalue(), box, 224)
    assert isinstance(img, Image.Image)


def test_without_a_compiler_everything_falls_back_to_pillow(photos, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BEIT_RAY_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=jpeg.__name__):
            assert native_library() is None
        assert "decoding with Pillow" in caplog.text
        data = jpeg_bytes(photos["coffee"])
        assert decode_jpeg_region(data, 1, (0, 0, 10, 10)) is None
        p, t, m = PretrainTransform(color_jitter=0.0)(data, "k")
        assert p.shape == (3, 224, 224) and t.shape == (3, 112, 112) and m.sum() > 0
    finally:
        native_library.cache_clear()


def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BEIT_RAY_CACHE", str(tmp_path))
    native_library.cache_clear()
    try:
        assert native_library() is not None
        built = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".so")
        assert len(built) == 1 and built[0].startswith("jpeg_region-")
        mtime = (tmp_path / built[0]).stat().st_mtime_ns
        native_library.cache_clear()
        assert native_library() is not None
        assert (tmp_path / built[0]).stat().st_mtime_ns == mtime  # reused, not rebuilt
    finally:
        native_library.cache_clear()
