"""Semantic-segmentation rows from an ADE20k-format tree (BEiT's UperNet fine-tuning data).

Layout: ``root/images/{training,validation}/<name>.jpg`` and
``root/annotations/{training,validation}/<name>.png`` (class ids, 0 = "other").

Rows: ``pixel_values`` uint8 [3, h, w], ``labels`` uint8, ``valid_hw`` int32 [2] (the real
pixels' extent), ``key`` str. With ``reduce_zero_label`` (ADE20k's convention) 0 becomes 255
(ignored) and k becomes k-1. The scale (long, short) is a field, by default mmseg's
(4 × crop, crop): ADE20k's (2048, 512) for crop 512, (256, 64) for crop 64.
Training (mmseg's UperNet pipeline): rescale by a ratio in 0.5–2.0 of the scale (aspect
kept), random crop (up to 10 redraws while one class covers ≥ 75 %), flip (p data.flip, 0.5),
PhotoMetricDistortion; rows are [3, c, c] with filler past ``valid_hw`` that the worker zeroes
after normalizing (mmseg pads after Normalize). Validation: images rescaled to the scale
(aspect kept) by :func:`eval_preprocessor`, the processor the run exports; labels at the
original size; the trainer slides windows and resizes the logits back to the labels (mmseg's
slide test).
"""

from __future__ import annotations

import math
import posixpath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from beit_ray import storage
from beit_ray.config import StorageConfig
from beit_ray.data.augment import draw_flip, image_rng
from beit_ray.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, open_image
from beit_ray.data.pipeline import write_errors

IGNORE = 255
SCALE_PER_CROP = 4
"""mmseg's training scale is (4 × crop, crop): ADE20k's (2048, 512) for a 512 crop."""


def train_scale(crop_size: int, scale: tuple[int, int] | None = None) -> tuple[int, int]:
    """(long, short) edge limits of the rescale: ``scale`` or mmseg's (4 × crop, crop)."""
    if scale is not None:
        return max(scale), min(scale)
    return SCALE_PER_CROP * crop_size, crop_size


def eval_preprocessor(crop_size: int, scale: tuple[int, int] | None = None) -> Any:
    """mmseg's test rescale (ratio kept, to :func:`train_scale`) as the processor a run exports
    (size {shortest_edge, longest_edge}): the run's eval, labelling and serving resize with this
    one definition. Rounding is transformers' (an edge can be 1 px under mmcv.rescale_size's),
    so transformers' BeitImageProcessor reads the export to the same size."""
    from beit_ray.models.preprocess import Preprocessor

    return Preprocessor.for_model(
        "beit", crop_size, segmentation=True, seg_scale=train_scale(crop_size, scale)
    )


def rescale_size(h: int, w: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) rescaled, ratio kept, as large as fits ``scale`` (long, short): mmcv.rescale_size."""
    sf = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(1, int(h * sf + 0.5)), max(1, int(w * sf + 0.5))


def resize_pair(
    image: np.ndarray, labels: np.ndarray | None, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image bilinear, labels nearest (mmseg's interpolations) to ``size`` (h, w)."""
    h, w = size
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    if labels is not None and labels.shape != (h, w):
        labels = np.asarray(Image.fromarray(labels).resize((w, h), Image.Resampling.NEAREST))
    return image, labels


def random_crop(
    image: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    crop_size: int,
    cat_max_ratio: float = 0.75,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg RandomCrop: up to 10 redraws while one class covers ≥ ``cat_max_ratio`` of the crop."""
    h, w = labels.shape
    ch, cw = min(crop_size, h), min(crop_size, w)

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))

    top, left = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            crop = labels[top : top + ch, left : left + cw]
            _, counts = np.unique(crop[crop != IGNORE], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()  # as mmseg: the 11th draw stands even if it fails too
    return image[top : top + ch, left : left + cw], labels[top : top + ch, left : left + cw]


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's convert: float multiply-add, clip to [0, 255], truncate to uint8."""
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] → float32 HSV, H in degrees [0, 360), S and V in [0, 1]."""
    x = rgb.astype(np.float32) / 255
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v, mn = x.max(-1), x.min(-1)
    c = v - mn
    safe = np.where(c > 0, c, 1)
    h = np.where(
        v == r, (g - b) / safe % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    h = np.where(c > 0, h * 60, 0)
    s = np.where(v > 0, c / np.where(v > 0, v, 1), 0)
    return np.stack([h, s, v], -1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """float32 HSV (as :func:`_rgb_to_hsv`) → uint8 [..., 3], rounded."""
    h, s, v = hsv[..., 0] / 60, hsv[..., 1], hsv[..., 2]
    c = v * s
    x = c * (1 - np.abs(h % 2 - 1))
    z = np.zeros_like(c)
    sector = np.floor(h).astype(np.int64) % 6
    r = np.choose(sector, [c, x, z, z, x, c])
    g = np.choose(sector, [x, c, c, x, z, z])
    b = np.choose(sector, [z, z, x, c, c, x])
    rgb = np.stack([r, g, b], -1) + (v - c)[..., None]
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def photo_metric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: float = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg PhotoMetricDistortion on uint8 RGB [H, W, 3], drawn from ``rng``.

    Each step with probability 0.5, in mmseg's order: brightness (+U(-32, 32)), contrast
    (×U(0.5, 1.5), right after brightness or last, by a coin), saturation (×U(0.5, 1.5)),
    hue (+randint(-18, 18) in OpenCV's 0–180 hue units, i.e. 2° each). mmseg goes through
    OpenCV's uint8 HSV; this stays in float HSV between the two conversions (no cv2 here),
    so a pixel can differ from mmseg's by a rounding step.
    """
    img = image
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    do_sat = bool(rng.integers(2))
    sat = rng.uniform(*saturation_range) if do_sat else 1.0
    do_hue = bool(rng.integers(2))
    hue = int(rng.integers(-hue_delta, hue_delta + 1)) if do_hue else 0
    if do_sat or do_hue:
        hsv = _rgb_to_hsv(img)
        hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 1)
        hsv[..., 0] = (hsv[..., 0] + 2 * hue) % 360
        img = _hsv_to_rgb(hsv)
    if not contrast_first and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(*contrast_range))
    return img


def seg_transform(
    image: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    crop_size: int,
    scale: tuple[int, int] | None = None,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    photometric: bool = True,
    flip: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """[H, W, 3] + [H, W] → [3, c, c] + [c, c] + the (h, w) of real pixels (top left).

    mmseg's order: Resize (ratio_range × scale, ratio kept), RandomCrop (cat_max_ratio 0.75),
    RandomFlip (p ``flip``), PhotoMetricDistortion. Rows past (h, w) are filler (image 0, labels 255):
    mmseg pads after Normalize, so the worker sets those pixels to 0 once normalized
    (:func:`pad_normalized`); labels are already final.
    """
    long, short = train_scale(crop_size, scale)
    r = rng.uniform(*ratio_range)
    size = rescale_size(*labels.shape, (int(long * r), int(short * r)))
    img, lab = resize_pair(image, labels, size)
    img, lab = random_crop(img, lab, rng, crop_size)
    if draw_flip(rng, flip):
        img, lab = img[:, ::-1], lab[:, ::-1]
    if photometric:
        img = photo_metric_distortion(np.ascontiguousarray(img), rng)
    ch, cw = lab.shape
    out_img = np.zeros((3, crop_size, crop_size), np.uint8)
    out_lab = np.full((crop_size, crop_size), IGNORE, np.uint8)
    out_img[:, :ch, :cw], out_lab[:ch, :cw] = img.transpose(2, 0, 1), lab
    return out_img, out_lab, (ch, cw)


def pad_normalized(x: torch.Tensor, valid_hw: torch.Tensor) -> torch.Tensor:
    """Normalized [B, 3, H, W] with each row zeroed past its real (h, w) [B, 2]: mmseg's Pad
    after Normalize (pad_val 0)."""
    hh = torch.arange(x.shape[-2], device=x.device).view(1, -1, 1)
    ww = torch.arange(x.shape[-1], device=x.device).view(1, 1, -1)
    hw = valid_hw.to(x.device).long()
    keep = (hh < hw[:, :1, None]) & (ww < hw[:, 1:, None])  # [B, H, W]
    return x * keep[:, None].to(x.dtype)


def slide_logits(forward: Any, x: torch.Tensor, crop: int, num_classes: int) -> torch.Tensor:
    """Logits [B, C, H, W] of normalized [B, 3, H, W] from ``crop`` windows at stride 2/3 crop.

    mmseg's slide mode (BEiT: stride 341 for 512), windows averaged. Inputs smaller than a
    window are padded with 0 (normalized) and cut back after. One forward call per batch (all
    windows stacked), so every rank makes the same number of calls, which ZeRO-3 needs.
    """
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    stride = max(1, crop * 2 // 3)
    if h < crop or w < crop:
        x = F.pad(x, (0, max(0, crop - w), 0, max(0, crop - h)))
    hp, wp = x.shape[-2:]
    ys = sorted(
        {min(i * stride, hp - crop) for i in range(math.ceil(max(hp - crop, 0) / stride) + 1)}
    )
    xs = sorted(
        {min(j * stride, wp - crop) for j in range(math.ceil(max(wp - crop, 0) / stride) + 1)}
    )
    wins = torch.cat([x[:, :, i : i + crop, j : j + crop] for i in ys for j in xs])
    out = F.interpolate(forward(wins).float(), size=(crop, crop), mode="bilinear")
    total = torch.zeros(b, num_classes, hp, wp, device=out.device)  # [B, C, hp, wp]
    count = torch.zeros(1, 1, hp, wp, device=out.device)
    for k, (i, j) in enumerate((i, j) for i in ys for j in xs):
        total[:, :, i : i + crop, j : j + crop] += out[k * b : (k + 1) * b]
        count[:, :, i : i + crop, j : j + crop] += 1
    return (total / count)[:, :, :h, :w]


def segment_logits(
    forward: Any, x: torch.Tensor, crop: int, num_classes: int, out_size: tuple[int, int]
) -> torch.Tensor:
    """mmseg's slide test: normalized test-scale [B, 3, h, w] → logits [B, C, H, W] at the
    original ``out_size`` (bilinear, align_corners False), ready for argmax against labels."""
    logits = slide_logits(forward, x, crop, num_classes)
    if tuple(logits.shape[-2:]) == tuple(out_size):
        return logits
    return F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)


def _read_pair(
    batch: dict[str, np.ndarray],
    train: bool,
    crop_size: int,
    scale: tuple[int, int] | None,
    reduce_zero_label: bool,
    seed: int,
    epoch: int,
    max_pixels: int,
    errors_uri: str | None,
    st: StorageConfig | None,
    clock: Any = None,
    flip: float = 0.5,
) -> dict[str, Any]:
    if clock is not None and train:  # the pass's epoch: new crops, flips, distortions each epoch
        import ray

        epoch = ray.get(clock.get.remote())[0]
    pix, labs, valid, keys, errors = [], [], [], [], []
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
            rng = image_rng(seed, epoch, str(key))
            p, lab, hw = seg_transform(image, labels, rng, crop_size, scale, flip=flip)
        else:  # mmseg's test rescale, by the processor the run exports; labels stay as they are
            p, lab = eval_preprocessor(crop_size, scale).to_uint8(image), labels
            hw = (p.shape[1], p.shape[2])
        pix.append(p)
        labs.append(lab)
        valid.append(hw)
        keys.append(str(key))
    write_errors(errors, errors_uri, st)
    valid_hw = np.array(valid, np.int32).reshape(-1, 2)
    if train:
        c = crop_size
        return {
            "pixel_values": np.stack(pix) if pix else np.zeros((0, 3, c, c), np.uint8),
            "labels": np.stack(labs) if labs else np.zeros((0, c, c), np.uint8),
            "valid_hw": valid_hw,
            "key": np.array(keys, dtype=object),
        }
    # Validation images differ in shape: hand Ray a list (variable-shaped tensors).
    return {"pixel_values": pix, "labels": labs, "valid_hw": valid_hw, "key": keys}


def segmentation_dataset(
    root: str,
    split: str = "training",
    *,
    crop_size: int = 512,
    scale: tuple[int, int] | None = None,
    reduce_zero_label: bool = True,
    seed: int = 0,
    epoch: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage_cfg: StorageConfig | None = None,
    errors_uri: str | None = None,
    train_augment: bool | None = None,
    clock: Any = None,
    flip: float = 0.5,
):  # noqa: ANN201 - ray.data.Dataset
    """ADE20k-format rows of ``split`` ("training" or "validation"); see the module docstring.
    With an epoch ``clock`` (:mod:`beit_ray.data.plan`) each pass draws that epoch's crops."""
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
            train=train, crop_size=crop_size, scale=scale, reduce_zero_label=reduce_zero_label, seed=seed,
            epoch=epoch, max_pixels=max_pixels, errors_uri=errors_uri, st=st, clock=clock,
            flip=flip,
        ),
        batch_size=16,
    )  # fmt: skip
