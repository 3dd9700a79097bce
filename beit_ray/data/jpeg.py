"""Decode just the crop of a JPEG: libjpeg's row skipping, column cropping and DCT scaling.

A random-resized crop keeps on average about half of the image, and the rows below it are
never needed. Pillow always decodes every pixel; ``native/jpeg_region.c`` asks libjpeg(-turbo)
for the crop only:

- rows above the crop are entropy-decoded but get no IDCT, upsampling or colour conversion
  (``jpeg_skip_scanlines``), and decoding stops after the crop's last row;
- columns outside the crop (rounded out to whole blocks, plus a 16-pixel margin so the chroma
  upsampler sees the same neighbours) get no IDCT or colour conversion
  (``jpeg_crop_scanline``);
- an optional DCT scale 1/2, 1/4 or 1/8, as Pillow's ``draft``.

The pixels are the ones a full Pillow decode gives for the same box (tested). On ImageNet-sized
JPEGs a random-resized crop decodes in ~0.55 ms (a random box in ~0.3 ms) against ~1.0 ms for
Pillow's full decode (bench/RESULTS.md).

The C file is compiled on first use (``cc -O2 -shared ... -ljpeg``, under a second) into
``$BEIT_RAY_CACHE`` (default ``~/.cache/beit_ray``) under a name carrying the source's hash, and
loaded with ctypes. Without a C compiler or libjpeg's headers (Debian/Ubuntu:
``libjpeg-dev``) everything falls back to Pillow with one warning. Any libjpeg error or
warning also falls back to Pillow for that image, so failures are classified in one place
(:mod:`beit_ray.data.decode`); so does a file that does not end with the EOI marker, because a
decode that stops at the crop would never notice a truncated tail.

    arr = decode_jpeg_region(data, scale=1, box=(left, top, right, bottom))  # uint8 [h, w, 3] or None
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

import numpy as np

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "jpeg_region.c")
EOI = b"\xff\xd9"
_ERR_LEN = 200


def cache_dir() -> str:
    return os.environ.get("BEIT_RAY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "beit_ray"
    )


def _build(src: str, dest: str) -> None:
    """Compile ``src`` into the shared library ``dest`` (atomic rename: never half written)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(dest))
    os.close(fd)
    try:
        cmd = [cc, "-O2", "-shared", "-fPIC", src, "-o", tmp, "-ljpeg"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-500:]}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=1)
def native_library() -> ctypes.CDLL | None:
    """The compiled region decoder (built once per machine and source version), or None."""
    try:
        with open(SOURCE, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        folder = cache_dir()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"jpeg_region-{digest}.so")
        if not os.path.exists(path):
            with open(path + ".lock", "w") as lock:  # one build per machine, however many workers
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not os.path.exists(path):
                    _build(SOURCE, path)
        lib = ctypes.CDLL(path)
    except Exception as e:
        log.warning("JPEG region decoder unavailable, decoding with Pillow: %s", e)
        return None
    lib.br_jpeg_region.restype = ctypes.c_int
    lib.br_jpeg_region.argtypes = [
        ctypes.c_char_p,  # data
        ctypes.c_ulong,  # size
        ctypes.c_int,  # scale numerator (over 8)
        ctypes.c_int,  # x0
        ctypes.c_int,  # y0
        ctypes.c_int,  # x1
        ctypes.c_int,  # y1
        ctypes.c_void_p,  # out: uint8 [y1 - y0, x1 - x0, 3]
        ctypes.c_char_p,  # error message
        ctypes.c_int,  # its capacity
    ]
    return lib


def scaled_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """libjpeg's output size at 1/``scale``: (ceil(width / scale), ceil(height / scale))."""
    return -(-width // scale), -(-height // scale)


def decode_jpeg_region(
    data: bytes, scale: int, box: tuple[int, int, int, int]
) -> np.ndarray | None:
    """Pixels ``box`` (left, top, right, bottom; whole pixels of the image decoded at
    1/``scale``, scale in 1, 2, 4, 8) of JPEG ``data`` → RGB uint8 [bottom - top, right - left, 3];
    None when the native decoder is unavailable or libjpeg reports anything (use Pillow)."""
    lib = native_library()
    if lib is None:
        return None
    if not isinstance(data, bytes):  # memoryview / bytearray from a reader
        data = bytes(data)
    if not data.endswith(EOI):
        return None
    left, top, right, bottom = box
    out = np.empty((bottom - top, right - left, 3), np.uint8)  # [h, w, 3]
    err = ctypes.create_string_buffer(_ERR_LEN)
    rc = lib.br_jpeg_region(
        data, len(data), 8 // scale, left, top, right, bottom, out.ctypes.data, err, _ERR_LEN
    )
    if rc != 0:
        log.debug("libjpeg declined %d bytes (%s): Pillow decodes them", len(data), err.value)
        return None
    return out
