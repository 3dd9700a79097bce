"""Class-id masks a person can look at: one palette for labelling, ``/segment``, the page and
the labelling preview.

A mask PNG keeps the class ids as its pixel values (``np.asarray(Image.open(png))`` is the
mask), written as a palette image (mode ``P``) so a viewer shows each class in its colour
instead of near-black greys. Beyond 256 classes (uint16 masks) a palette cannot index every
id: those stay 16-bit greyscale.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np

GOLDEN = 0.618033988749895
"""Hue step between consecutive ids: neighbouring ids (often related classes) get far-apart
hues, and no two of the first few hundred ids share a colour."""


def palette(n: int = 256) -> np.ndarray:
    """uint8 [n, 3]: id ``i``'s colour. Hues step by the golden ratio; saturation and value
    cycle through three levels each, so ids whose hues come close still differ in shade."""
    out = np.empty((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (0.07 + i * GOLDEN) % 1.0
        sat = (0.85, 0.6, 0.95)[i % 3]
        val = (0.95, 0.75, 0.55)[(i // 3) % 3]
        out[i] = np.round(np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255)
    return out


PALETTE = palette(256)


def hex_color(class_id: int) -> str:
    """``#rrggbb`` of a class id (ids past 255 wrap, as in no mask PNG)."""
    r, g, b = PALETTE[int(class_id) % 256]
    return f"#{r:02x}{g:02x}{b:02x}"


def mask_png(mask: np.ndarray) -> bytes:
    """A class-id map as a lossless PNG: uint8 ids (up to 256 classes, as the predictor gives
    them) as a palette image whose values are the ids; wider ids as 16-bit greyscale."""
    from PIL import Image

    if mask.dtype == np.uint8:
        image = Image.fromarray(mask)  # mode L ...
        image.putpalette(PALETTE.tobytes())  # ... becomes P, the same values
    else:
        image = Image.fromarray(mask.astype(np.uint16))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def colorize(mask: np.ndarray) -> np.ndarray:
    """[H, W] class ids → uint8 [H, W, 3] colours."""
    return PALETTE[np.asarray(mask).astype(np.int64) % 256]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3] image with its [H, W] mask's colours blended in at ``alpha``."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colorize(mask).astype(np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)
