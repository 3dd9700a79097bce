"""A small real-image dataset for the demo runs, made offline from scikit-image's photos.

``make_demo_images(root)`` writes ``root/images/<photo>/<i>.jpg``: random crops of the bundled
photos, one class folder per photo (so the same folder serves pretraining and classification).
``ensure_demo_data(cfg)`` also fits the codebook visual tokenizer on it, once.
"""

from __future__ import annotations

import io
import os

import numpy as np

from beit_ray.config import StorageConfig
from beit_ray.data.config import DataConfig

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "coins",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
)


def load_photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos as RGB uint8 [H, W, 3] (grey and RGBA converted)."""
    from skimage import data

    img = getattr(data, name)()
    img = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]
    return np.ascontiguousarray(img).astype(np.uint8)


def make_demo_images(root: str, per_photo: int = 32, size: int = 96, seed: int = 0) -> str:
    """Write ``per_photo`` random crops of each photo as JPEGs; returns the images folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = os.path.join(root, "images")
    for name in PHOTOS:
        img = load_photo(name)  # [H, W, 3]
        os.makedirs(os.path.join(out, name), exist_ok=True)
        h, w = img.shape[:2]
        for i in range(per_photo):
            side = int(rng.integers(min(h, w) // 4, min(h, w) // 2))
            y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
            crop = Image.fromarray(np.ascontiguousarray(img[y : y + side, x : x + side])).resize(
                (size, size)
            )
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            with open(os.path.join(out, name, f"{i:03d}.jpg"), "wb") as f:
                f.write(buf.getvalue())
    return out


def ensure_demo_data(
    data_cfg: DataConfig, vocab_size: int, storage_cfg: StorageConfig | None = None
) -> None:
    """Create the demo images and fit their codebook tokenizer unless they exist already.

    ``data_cfg`` is the job's DataConfig; its ``source`` must be ``<root>/images`` and its
    ``tokenizer_weights`` where the codebook goes. Needs Ray (the fit runs on Ray Data).
    """
    from beit_ray.data.config import CodebookConfig, FitTokenizerConfig
    from beit_ray.data.fit import fit_codebook

    source = data_cfg.source
    if not os.path.isdir(source):
        make_demo_images(os.path.dirname(os.path.abspath(source)))
    weights = data_cfg.tokenizer_weights
    if weights and not os.path.exists(weights):
        print(f"fitting a {vocab_size}-code tokenizer on {source} → {weights}", flush=True)
        fit_codebook(
            FitTokenizerConfig(
                input=source,
                output=weights,
                data=data_cfg,
                codebook=CodebookConfig(
                    vocab_size=vocab_size, sample_images=256, patches_per_image=16, iterations=10
                ),
                storage=storage_cfg or StorageConfig(),
            )
        )
