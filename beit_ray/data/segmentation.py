"""Semantic-segmentation rows from an ADE20k-format tree (BEiT's UperNet fine-tuning data).

Layout: ``root/images/{training,validation}/<name>.jpg`` and
``root/annotations/{training,validation}/<name>.png`` (class ids, 0 = "other").

Rows: ``pixel_values`` uint8 [3, H, W], ``labels`` uint8 [H, W], ``key`` str (the image name).
With ``reduce_zero_label`` (ADE20k's convention) 0 becomes 255 (ignored) and k becomes k-1.
Training (mmseg's ADE20k recipe): random rescale with ratio 0.5–2.0 of the (2048, 512) scale,
random crop ``crop_size`` (up to 10 tries so one class covers < 75 %), horizontal flip 0.5,
pad to ``crop_size`` (pixels 0, labels 255). Validation: full images (variable H, W); the
trainer runs sliding-window inference.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
from PIL import Image

from beit_ray import storage
from beit_ray.config import StorageConfig
from beit_ray.data.augment import image_rng
from beit_ray.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, open_image
from beit_ray.data.pipeline import write_errors

IGNORE = 255


def seg_transform(
    image: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    crop_size: int,
    ratio_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, 3] + [H, W] → rescaled, cropped, flipped, padded [3, c, c] + [c, c]."""
    h, w = labels.shape
    r = rng.uniform(*ratio_range)
    sf = min(2048 * r / max(h, w), 512 * r / min(h, w))
    nw, nh = max(1, int(w * sf + 0.5)), max(1, int(h * sf + 0.5))
    img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    lab = np.asarray(Image.fromarray(labels).resize((nw, nh), Image.Resampling.NEAREST))
    ch, cw = min(crop_size, nh), min(crop_size, nw)
    for _ in range(10):
        top, left = int(rng.integers(0, nh - ch + 1)), int(rng.integers(0, nw - cw + 1))
        crop = lab[top : top + ch, left : left + cw]
        _, counts = np.unique(crop[crop != IGNORE], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
            break
    img, lab = img[top : top + ch, left : left + cw], lab[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    out_img = np.zeros((crop_size, crop_size, 3), np.uint8)
    out_lab = np.full((crop_size, crop_size), IGNORE, np.uint8)
    out_img[:ch, :cw], out_lab[:ch, :cw] = img, lab
    return np.ascontiguousarray(out_img.transpose(2, 0, 1)), out_lab


def _read_pair(
    batch: dict[str, np.ndarray],
    train: bool,
    crop_size: int,
    reduce_zero_label: bool,
    seed: int,
    epoch: int,
    max_pixels: int,
    errors_uri: str | None,
    st: StorageConfig | None,
) -> dict[str, Any]:
    pix, labs, keys, errors = [], [], [], []
    for key, img_uri, ann_uri in zip(
        batch["key"], batch["image"], batch["annotation"], strict=True
    ):
        try:
            image = decode_image(storage.read_bytes(str(img_uri), st), max_pixels)
            ann = open_image(storage.read_bytes(str(ann_uri), st), max_pixels)
            labels = np.asarray(
                ann.convert("L") if ann.mode not in ("L", "P") else ann, dtype=np.uint8
            )
            if labels.shape != image.shape[:2]:
                raise DecodeError(
                    "mismatch", f"image {image.shape[:2]} vs annotation {labels.shape}"
                )
        except Exception as e:
            errors.append({"key": str(key), "path": str(img_uri), "reason": str(e)})
            continue
        if reduce_zero_label:
            labels = ((labels.astype(np.int16) - 1) % 256).astype(np.uint8)  # 0 → 255
        if train:
            p, lab = seg_transform(image, labels, image_rng(seed, epoch, str(key)), crop_size)
        else:
            p, lab = np.ascontiguousarray(image.transpose(2, 0, 1)), labels
        pix.append(p)
        labs.append(lab)
        keys.append(str(key))
    write_errors(errors, errors_uri, st)
    if train:
        return {
            "pixel_values": np.stack(pix)
            if pix
            else np.zeros((0, 3, crop_size, crop_size), np.uint8),
            "labels": np.stack(labs) if labs else np.zeros((0, crop_size, crop_size), np.uint8),
            "key": np.array(keys, dtype=object),
        }
    # Full-size validation images differ in shape: hand Ray a list (variable-shaped tensors).
    return {"pixel_values": pix, "labels": labs, "key": keys}


def segmentation_dataset(
    root: str,
    split: str = "training",
    *,
    crop_size: int = 512,
    reduce_zero_label: bool = True,
    seed: int = 0,
    epoch: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage_cfg: StorageConfig | None = None,
    errors_uri: str | None = None,
    train_augment: bool | None = None,
):  # noqa: ANN201 - ray.data.Dataset
    """ADE20k-format rows of ``split`` ("training" or "validation"); see the module docstring."""
    import ray

    st = storage_cfg
    img_dir, ann_dir = storage.join(root, "images", split), storage.join(root, "annotations", split)
    images = storage.list_files(img_dir, st, suffixes=(".jpg", ".jpeg", ".png"))
    anns = {
        posixpath.splitext(posixpath.basename(u))[0]: u
        for u in storage.list_files(ann_dir, st, suffixes=(".png",))
    }
    if not images:
        raise ValueError(f"no images under {img_dir}")
    items = []
    for u in images:
        stem = posixpath.splitext(posixpath.basename(u))[0]
        items.append(
            {
                "key": stem,
                "image": u,
                "annotation": anns.get(stem, storage.join(ann_dir, stem + ".png")),
            }
        )
    train = split == "training" if train_augment is None else train_augment
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), max(1, len(items) // 16)))
    return ds.map_batches(
        _read_pair,
        fn_kwargs=dict(
            train=train, crop_size=crop_size, reduce_zero_label=reduce_zero_label, seed=seed,
            epoch=epoch, max_pixels=max_pixels, errors_uri=errors_uri, st=st,
        ),
        batch_size=16,
    )  # fmt: skip
