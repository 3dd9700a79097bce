"""A small real-image dataset for the demo runs, made offline from scikit-image's photos.

``make_demo_images(root)`` writes ``root/images/<photo>/<i>.jpg``: random crops of the bundled
photos, one class folder per photo (so the same folder serves pretraining and classification).
``ensure_demo_data(cfg)`` also fits the codebook visual tokenizer on it, once.

The embedded default keeps both under the run storage, ``<checkpoint.storage_path>/demo-data``
(:func:`demo_argv`), never under the driver's working dir: on a cluster, tokenizer actors and
read tasks on other nodes open them, and a submitted job's working dir is each node's own copy.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from beit_ray import storage
from beit_ray.config import StorageConfig, parse_args
from beit_ray.data.config import DataConfig

DEMO_DIR = "demo-data"

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


def demo_root(storage_path: str) -> str:
    """``<storage_path>/demo-data``, absolute: the same URI on every node that shares it."""
    base = storage_path if storage.is_remote(storage_path) else os.path.abspath(storage_path)
    return storage.join(base, DEMO_DIR)


def demo_argv(cls: type, preset: list[str], argv: list[str]) -> list[str]:
    """``preset + argv`` for a job on its embedded demo data, with the demo images (and, for a
    codebook tokenizer, the codebook) under the run storage that ``preset + argv`` names.
    ``argv`` comes last, so a field given there still wins."""
    first: Any = parse_args(cls, preset + argv)
    root = demo_root(first.checkpoint.storage_path)
    paths = ["--data.source", storage.join(root, "images")]
    if first.data.tokenizer == "codebook":
        paths += ["--data.tokenizer_weights", storage.join(root, "codebook.safetensors")]
    return preset + paths + argv


def is_demo_source(source: str) -> bool:
    """A ``.../demo-data/images`` source: the jobs make it when it is missing."""
    return source.rstrip("/").endswith(f"{DEMO_DIR}/images")


def ensure_demo_images(source: str, storage_cfg: StorageConfig | None = None) -> None:
    """Write the demo images at ``source`` (a local path or an object-store URI) unless there.

    Locally they are made in a temporary folder beside ``source`` and moved there in one
    rename, so an interrupted job never leaves a partial folder that a rerun takes as complete
    (an object store gets them uploaded file by file).
    """
    if storage.exists(source, storage_cfg):
        return
    if storage.is_remote(source):
        with tempfile.TemporaryDirectory(prefix="beit_demo_") as tmp:
            storage.upload_dir(make_demo_images(tmp), source, storage_cfg)
        return
    path = os.path.abspath(storage.strip_scheme(source))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=os.path.dirname(path))
    try:
        os.replace(make_demo_images(tmp), path)
    except OSError:
        if not os.path.isdir(path):  # not another job that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    ensure_demo_images(source, storage_cfg)
    weights = data_cfg.tokenizer_weights
    if weights and not storage.exists(weights, storage_cfg):
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
