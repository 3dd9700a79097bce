"""Patches of scikit-image's photos as a second offline labelled set (bench only), one the
recipe was never tuned on: the class is the photo a 32 px patch was cut from.

Ten photos (textures and scenes: brick, grass, gravel, camera, coins, moon, horse, clock,
immunohistochemistry, hubble_deep_field), each scaled so its short side is ``scale`` pixels;
train patches are cut at random places in the left 60 % of the photo, val patches in the right
40 % (no pixel is in both splits). Written as ``<root>/<split>/<class>/*.png`` like
``_digits.write_digits``, with the same ``few`` subset (a stratified fraction of train).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

PHOTOS = (
    "brick", "grass", "gravel", "camera", "coins",
    "moon", "horse", "clock", "immunohistochemistry", "hubble_deep_field",
)  # fmt: skip


def _photo(name: str, scale: int) -> np.ndarray:
    import skimage.data

    a = np.asarray(getattr(skimage.data, name)())
    if a.dtype != np.uint8:  # horse is boolean
        a = (a > 0).astype(np.uint8) * 255 if a.dtype == bool else a.astype(np.uint8)
    img = Image.fromarray(a).convert("RGB")
    w, h = img.size
    k = scale / min(w, h)
    return np.asarray(img.resize((round(w * k), round(h * k)), Image.BICUBIC))


def write_patches(
    root: str,
    size: int = 32,
    train_per_class: int = 140,
    val_per_class: int = 40,
    few_fraction: float = 0.1,
    scale: int = 128,
    seed: int = 0,
) -> dict[str, str]:
    """Folders {"train", "val", "few"} of ``size`` px patches, one class per photo."""
    rng = np.random.default_rng(seed)
    out = {s: os.path.join(root, s) for s in ("train", "val", "few")}
    few_n = round(train_per_class * few_fraction)
    for c, name in enumerate(PHOTOS):
        photo = _photo(name, scale)  # [H, W, 3]
        h, w, _ = photo.shape
        cut = int(w * 0.6)
        for split, n, lo, hi in (
            ("train", train_per_class, 0, cut),
            ("val", val_per_class, cut, w),
        ):
            folder = os.path.join(out[split], f"{c}_{name}")
            os.makedirs(folder, exist_ok=True)
            ys = rng.integers(0, h - size + 1, n)
            xs = rng.integers(lo, hi - size + 1, n)
            for i, (y, x) in enumerate(zip(ys, xs, strict=True)):
                patch = Image.fromarray(photo[y : y + size, x : x + size])
                patch.save(os.path.join(folder, f"{i:04d}.png"))
                if split == "train" and i < few_n:  # random places: the first few are a sample
                    few = os.path.join(out["few"], f"{c}_{name}")
                    os.makedirs(few, exist_ok=True)
                    patch.save(os.path.join(few, f"{i:04d}.png"))
    return out
