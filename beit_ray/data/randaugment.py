"""RandAugment on PIL images, as timm's ``rand_augment_transform`` (BEiT's ``--aa`` default).

A spec like ``rand-m9-mstd0.5-inc1`` picks ``n`` ops (default 2, with replacement) from 15;
each runs with probability ``p`` (0.5) at magnitude ``m`` (0-10), jittered per op by
N(0, mstd) and clipped to [0, mmax]. ``inc1`` selects the ops whose strength grows with the
magnitude (Posterize/Solarize/enhance ops otherwise weaken or flip direction as m grows).
Geometric ops resample bicubically (BEiT's train interpolation) and fill with the
normalization mean, which normalizes to ~0.

All randomness comes from the caller's ``np.random.Generator`` (the per-image RNG), so an
image's ops are fixed by (seed, epoch, key) however the data is partitioned.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0
"""Magnitudes are on timm's 0..10 scale."""
BICUBIC = Image.Resampling.BICUBIC
Fill = tuple[int, int, int]


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed ``rand-...`` spec."""

    magnitude: float = 10.0
    num_ops: int = 2
    mstd: float = 0.0
    mmax: float = LEVEL_DENOM
    increasing: bool = False
    prob: float = 0.5


_KEYS = {"m": "magnitude", "n": "num_ops", "mstd": "mstd", "mmax": "mmax", "inc": "increasing"}


def parse_rand_augment(spec: str | None) -> RandAugmentSpec | None:
    """``rand-m9-mstd0.5-inc1`` → RandAugmentSpec; '' or None → None; ValueError naming the part."""
    if not spec:
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"{spec!r} must start with 'rand' (e.g. rand-m9-mstd0.5-inc1)")
    kw: dict[str, float | int | bool] = {}
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", part)
        if m is None or (m.group(1) not in _KEYS and m.group(1) != "p"):
            raise ValueError(
                f"{spec!r}: cannot read {part!r}; known parts are m<magnitude>, n<ops>, "
                "mstd<std>, mmax<max>, inc<0|1>, p<prob>"
            )
        key, val = m.group(1), float(m.group(2))
        if key == "n":
            if val != int(val) or val < 1:
                raise ValueError(f"{spec!r}: n must be an integer ≥ 1")
            kw["num_ops"] = int(val)
        elif key == "inc":
            kw["increasing"] = bool(val)
        elif key == "mstd":
            kw["mstd"] = math.inf if val > 100 else val  # timm: mstd > 100 → uniform [0, m]
        elif key == "p":
            if val > 1:
                raise ValueError(f"{spec!r}: p must be in [0, 1]")
            kw["prob"] = val
        else:
            kw[_KEYS[key]] = val
    return RandAugmentSpec(**kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- level → argument
# Each takes the (jittered, clipped) magnitude, the spec and the RNG (for the random sign).


def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v


def _rotate_arg(m: float, rng: np.random.Generator) -> float:
    return _signed(m / LEVEL_DENOM * 30.0, rng)  # degrees, ±30 at m 10


def _shear_arg(m: float, rng: np.random.Generator) -> float:
    return _signed(m / LEVEL_DENOM * 0.3, rng)


def _translate_arg(m: float, rng: np.random.Generator) -> float:
    return _signed(m / LEVEL_DENOM * 0.45, rng)  # fraction of the side


def _posterize_arg(m: float, rng: np.random.Generator) -> int:
    return int(m / LEVEL_DENOM * 4)  # bits kept, 0..4: fewer bits at LOW magnitude


def _posterize_inc_arg(m: float, rng: np.random.Generator) -> int:
    return max(0, 4 - _posterize_arg(m, rng))  # 4 bits at m 0 down to 0 at m 10


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep ``bits`` high bits per channel; 0 bits is black (Pillow refuses 0, timm's maths
    reaches it at magnitude 10, which m9 with mstd 0.5 draws now and then)."""
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits)


def _solarize_arg(m: float, rng: np.random.Generator) -> int:
    return min(256, int(m / LEVEL_DENOM * 256))  # threshold: inverts MORE at low magnitude


def _solarize_inc_arg(m: float, rng: np.random.Generator) -> int:
    return 256 - _solarize_arg(m, rng)


def _solarize_add_arg(m: float, rng: np.random.Generator) -> int:
    return min(128, int(m / LEVEL_DENOM * 110))


def _enhance_arg(m: float, rng: np.random.Generator) -> float:
    return m / LEVEL_DENOM * 1.8 + 0.1  # factor 0.1..1.9, 1 (identity) at m ≈ 5


def _enhance_inc_arg(m: float, rng: np.random.Generator) -> float:
    return max(0.1, 1.0 + _signed(m / LEVEL_DENOM * 0.9, rng))  # 1 at m 0, 1 ± 0.9 at m 10


# --------------------------------------------------------------------------- the ops


def _affine(img: Image.Image, coeffs: tuple[float, ...], fill: Fill) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, BICUBIC, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, fill: Fill, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhance(kind: type) -> Callable[[Image.Image, float, Fill], Image.Image]:
    return lambda img, f, fill: kind(img).enhance(f)


Op = tuple[Callable | None, Callable]  # (level → arg, (img, arg, fill) → img)

OPS: dict[str, Op] = {
    "AutoContrast": (None, lambda img, _, fill: ImageOps.autocontrast(img)),
    "Equalize": (None, lambda img, _, fill: ImageOps.equalize(img)),
    "Invert": (None, lambda img, _, fill: ImageOps.invert(img)),
    "Rotate": (_rotate_arg, lambda img, d, fill: img.rotate(d, BICUBIC, fillcolor=fill)),
    "Posterize": (_posterize_arg, lambda img, b, fill: _posterize(img, b)),
    "PosterizeIncreasing": (_posterize_inc_arg, lambda img, b, fill: _posterize(img, b)),
    "Solarize": (_solarize_arg, lambda img, t, fill: ImageOps.solarize(img, t)),
    "SolarizeIncreasing": (_solarize_inc_arg, lambda img, t, fill: ImageOps.solarize(img, t)),
    "SolarizeAdd": (_solarize_add_arg, _solarize_add),
    "Color": (_enhance_arg, _enhance(ImageEnhance.Color)),
    "ColorIncreasing": (_enhance_inc_arg, _enhance(ImageEnhance.Color)),
    "Contrast": (_enhance_arg, _enhance(ImageEnhance.Contrast)),
    "ContrastIncreasing": (_enhance_inc_arg, _enhance(ImageEnhance.Contrast)),
    "Brightness": (_enhance_arg, _enhance(ImageEnhance.Brightness)),
    "BrightnessIncreasing": (_enhance_inc_arg, _enhance(ImageEnhance.Brightness)),
    "Sharpness": (_enhance_arg, _enhance(ImageEnhance.Sharpness)),
    "SharpnessIncreasing": (_enhance_inc_arg, _enhance(ImageEnhance.Sharpness)),
    "ShearX": (_shear_arg, lambda img, f, fill: _affine(img, (1, f, 0, 0, 1, 0), fill)),
    "ShearY": (_shear_arg, lambda img, f, fill: _affine(img, (1, 0, 0, f, 1, 0), fill)),
    "TranslateXRel": (
        _translate_arg,
        lambda img, p, fill: _affine(img, (1, 0, p * img.width, 0, 1, 0), fill),
    ),
    "TranslateYRel": (
        _translate_arg,
        lambda img, p, fill: _affine(img, (1, 0, 0, 0, 1, p * img.height), fill),
    ),
}

RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
"""timm's ``_RAND_TRANSFORMS``."""
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
"""timm's ``_RAND_INCREASING_TRANSFORMS`` (``inc1``)."""


def apply_op(
    img: Image.Image, name: str, magnitude: float, rng: np.random.Generator, fill: Fill
) -> Image.Image:
    """One op at a fixed magnitude (no probability, no jitter); the RNG only picks the sign."""
    level_fn, fn = OPS[name]
    arg = level_fn(magnitude, rng) if level_fn is not None else None
    return fn(img, arg, fill)


def rand_augment(
    img: Image.Image, spec: RandAugmentSpec, rng: np.random.Generator, fill: Fill
) -> Image.Image:
    """``spec.num_ops`` ops drawn with replacement, each applied with probability ``spec.prob``."""
    names = RAND_INCREASING_TRANSFORMS if spec.increasing else RAND_TRANSFORMS
    for i in rng.integers(0, len(names), size=spec.num_ops).tolist():
        if spec.prob < 1.0 and rng.random() > spec.prob:
            continue
        m = spec.magnitude
        if spec.mstd == math.inf:
            m = rng.uniform(0, m)
        elif spec.mstd > 0:
            m = rng.normal(m, spec.mstd)
        m = max(0.0, min(float(m), spec.mmax))
        img = apply_op(img, names[i], m, rng, fill)
    return img
