"""BEiT's two-view augmentation (unilm ``DataAugmentationForBEiT``) and the fine-tuning transforms.

Pretraining: horizontal flip (p ``data.flip``, 0.5 as unilm), then ONE random-resized crop
(torchvision's sampling: 10 tries, then a centre-crop fallback) resized twice: the patch view
(bicubic) and the tokenizer view (Lanczos); optional colour jitter (brightness/contrast/
saturation in random order, same factors on both views; unilm jitters the whole image before
cropping, we jitter the two small views, which differs only in the contrast mean); then the
block mask.

Everything random comes from :func:`image_rng` (seed, epoch, key): the same image gets the same
crop, flip, jitter and mask however Ray Data partitions the data. The crop is chosen in the
original coordinates before decoding, so a JPEG is decoded at the smallest DCT scale that
still leaves the crop at least the output size.

Resizes run on torch's vectorized kernels with Pillow's filters (:mod:`beit_ray.data.resize`).
Pixels stay uint8 (CHW); consumers call :func:`normalize`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from beit_ray.data.decode import (
    DEFAULT_MAX_PIXELS,
    decode_image,
    load_rgb,
    open_image,
    oriented_size,
    upright,
)
from beit_ray.data.jpeg import decode_jpeg_region, scaled_size
from beit_ray.data.masking import BlockMaskGenerator
from beit_ray.data.randaugment import parse_rand_augment
from beit_ray.data.randaugment import rand_augment as apply_rand_augment
from beit_ray.data.resize import pixel_box, resize_box, resize_lanczos
from beit_ray.models.preprocess import Preprocessor

MEANS = {"beit": (0.5, 0.5, 0.5), "imagenet": (0.485, 0.456, 0.406)}
STDS = {"beit": (0.5, 0.5, 0.5), "imagenet": (0.229, 0.224, 0.225)}


def stable_hash(key: str) -> int:
    """A 64-bit hash of ``key`` that is the same in every process and run (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def image_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The one RNG for everything random about ``key`` in ``epoch``."""
    return np.random.default_rng([seed, epoch, stable_hash(key)])


def mean_fill(kind: str = "beit") -> tuple[int, int, int]:
    """``kind``'s mean as a uint8 colour (imagenet: (124, 116, 104)), which normalizes to ~0."""
    r, g, b = (min(255, round(255 * m)) for m in MEANS[kind])
    return r, g, b


def normalize(x, kind: str = "beit"):  # noqa: ANN001, ANN201 - numpy or torch, [..., 3, H, W]
    """uint8 [..., 3, H, W] (numpy or torch) → float32 normalized with ``kind``'s mean/std."""
    mean = np.asarray(MEANS[kind], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(STDS[kind], dtype=np.float32).reshape(3, 1, 1)
    if isinstance(x, np.ndarray):
        return (x.astype(np.float32) / 255.0 - mean) / std
    m, s = torch.from_numpy(mean).to(x.device), torch.from_numpy(std).to(x.device)
    return (x.float() / 255.0 - m) / s


def sample_crop(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode_region(
    data: bytes,
    box_fn,  # noqa: ANN001 - (oriented w, h) -> (left, top, right, bottom) in those coordinates
    out_side: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = True,
    region: bool = True,
) -> tuple[Image.Image | np.ndarray, tuple[float, float, float, float]]:
    """Decode just enough of ``data`` for a box chosen on the oriented size.

    Returns (pixels, box): the decoded RGB image and the box rescaled to it, or, when the crop
    alone was decoded (``region``: upright RGB/gray JPEGs, :mod:`beit_ray.data.jpeg`), a uint8
    [h, w, 3] array holding exactly the box's pixels and the box (0, 0, w, h)."""
    img = open_image(data, max_pixels)
    ow, oh = oriented_size(img)
    left, top, right, bottom = box_fn(ow, oh)
    scale = 1
    if draft and img.format == "JPEG":
        bw, bh = right - left, bottom - top
        for s in (2, 4, 8):
            if bw / s >= out_side and bh / s >= out_side:
                scale = s
    if region and img.format == "JPEG" and img.mode in ("RGB", "L") and upright(img):
        w, h = scaled_size(ow, oh, scale)
        fx, fy = w / ow, h / oh
        px = pixel_box((left * fx, top * fy, right * fx, bottom * fy), w, h)
        arr = decode_jpeg_region(data, scale, px)  # None: libjpeg said something → Pillow
        if arr is not None:
            return arr, (0, 0, arr.shape[1], arr.shape[0])
    rgb = load_rgb(img, scale)
    fx, fy = rgb.width / ow, rgb.height / oh
    return rgb, (left * fx, top * fy, right * fx, bottom * fy)


def draw_flip(rng: np.random.Generator, p: float) -> bool:
    """A horizontal flip with probability ``p``. Always one draw from ``rng``, whatever ``p``,
    so the crop, jitter and mask drawn after it are the same with flips on or off."""
    return bool(rng.random() < p)


def to_chw(x: torch.Tensor, flip: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """torch uint8 [3, H, W] (any strides) → numpy [3, H, W] (mirrored when ``flip``), written
    into ``out`` when given."""
    a = x.numpy()
    if flip:
        a = a[:, :, ::-1]
    if out is None:
        return np.ascontiguousarray(a)
    out[...] = a  # one strided copy: flip + layout together
    return out


GRAY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as Pillow's "L" and torchvision


def color_jitter(
    views: list[torch.Tensor], strength: float, rng: np.random.Generator
) -> list[torch.Tensor]:
    """Brightness, contrast, saturation (torchvision ``ColorJitter(s, s, s)``: factors uniform in
    [1 - s, 1 + s], random order, clipped after each) on uint8 [3, H, W] torch views, with the
    same factors and order for every view; returns new uint8 views.

    brightness: x·f; contrast: x·f + mean(gray(x))·(1 - f); saturation: x·f + gray(x)·(1 - f).
    In place on one float copy per view (≈ 0.36 ms for 224² + 112² on one core; 0.93 ms in numpy)."""
    factors = rng.uniform(1 - strength, 1 + strength, size=3).tolist()
    order = rng.permutation(3).tolist()
    gray_w = torch.tensor(GRAY, dtype=torch.float32)
    out = []
    for v in views:
        x = v.float()  # [3, H, W]
        for op in order:
            f = factors[op]
            if op == 0:  # brightness
                x.mul_(f)
            elif op == 1:  # contrast: blend with the mean gray level
                m = float(x.mean(dim=(1, 2)) @ gray_w)
                x.mul_(f).add_(m * (1 - f))
            else:  # saturation: blend with the gray image
                gray = torch.einsum("c,chw->hw", gray_w, x)  # [H, W]
                x.mul_(f).add_(gray.mul_(1 - f))
            x.clamp_(0, 255)
        out.append(x.round_().to(torch.uint8))
    return out


@dataclass
class PretrainTransform:
    """bytes + key + epoch → (patch view [3,S,S], tokenizer view [3,T,T], mask [N]), all uint8/bool."""

    image_size: int = 224
    tokenizer_size: int = 112
    grid: int = 14
    num_masking_patches: int = 75
    min_num_patches: int = 16
    max_num_patches: int | None = None
    min_aspect: float = 0.3
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float = 0.4
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True
    seed: int = 0
    tokenizer_view: str = "patch"
    region_decode: bool = True
    flip: float = 0.5
    """Horizontal flip probability (0 never, 1 always)."""

    def __post_init__(self) -> None:
        if self.tokenizer_view not in ("patch", "crop"):
            raise ValueError(
                f"tokenizer_view must be 'patch' or 'crop', not {self.tokenizer_view!r}"
            )
        self.masker = BlockMaskGenerator(
            self.grid,
            self.num_masking_patches,
            self.min_num_patches,
            self.max_num_patches,
            self.min_aspect,
        )

    @classmethod
    def from_config(cls, cfg) -> PretrainTransform:  # noqa: ANN001 - DataConfig
        return cls(
            cfg.image_size, cfg.tokenizer_image_size, cfg.grid, cfg.masking_patches, cfg.min_patches,
            cfg.max_num_patches, cfg.min_aspect, tuple(cfg.crop_scale), tuple(cfg.crop_ratio),
            cfg.color_jitter, cfg.max_pixels, cfg.draft, cfg.seed,
            getattr(cfg, "tokenizer_view", "patch"), cfg.region_decode, cfg.flip,
        )  # fmt: skip

    def __call__(
        self,
        data: bytes,
        key: str,
        epoch: int = 0,
        out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(patch [3,S,S] uint8, tokenizer view [3,T,T] uint8, mask [N] bool), into ``out`` if given."""
        rng = image_rng(self.seed, epoch, key)
        flip = draw_flip(rng, self.flip)

        def box(w: int, h: int) -> tuple[float, float, float, float]:
            i, j, ch, cw = sample_crop(rng, w, h, self.crop_scale, self.crop_ratio)
            if flip:  # crop of the flipped image = mirrored crop of the original, flipped
                j = w - j - cw
            return j, i, j + cw, i + ch

        s, t = self.image_size, self.tokenizer_size
        img, b = decode_region(
            data, box, max(s, t), self.max_pixels, self.draft, self.region_decode
        )
        patch = resize_box(img, b, s, "bicubic")  # [3, S, S] uint8 (see data/resize.py)
        if self.tokenizer_view == "patch" and t <= s:
            tok = patch if t == s else resize_lanczos(patch, t)  # [3, T, T]
        else:  # unilm: both views from the crop
            tok = resize_box(img, b, t, "lanczos")
        if self.color_jitter > 0:  # on the small views (commutes with the flip)
            patch, tok = color_jitter([patch, tok], self.color_jitter, rng)
        po, to, mo = out if out is not None else (None, None, None)
        views = [to_chw(patch, flip, po), to_chw(tok, flip, to)]
        mask = self.masker(rng).reshape(-1)  # [N]
        if mo is not None:
            mo[...] = mask
            mask = mo
        return views[0], views[1], mask


@dataclass
class ClassifyTransform:
    """Fine-tuning views: train = random-resized crop + flip (+ RandAugment when
    ``rand_augment`` is a spec such as ``rand-m9-mstd0.5-inc1``); eval = the exported model's
    own preprocessing (:meth:`Preprocessor.for_model`: shorter side → size / crop_pct, bicubic,
    centre crop), so a run's validation score is what labelling and serving get. RandAugment
    draws from the same per-image RNG, after the crop and flip, so those are unchanged by
    turning it on."""

    image_size: int = 224
    train: bool = True
    crop_pct: float | None = None
    """Eval: shorter side resized to image_size / crop_pct; unset: 0.875 below 384 px, else 1."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True
    seed: int = 0
    rand_augment: str | None = None
    fill: tuple[int, int, int] = (124, 116, 104)
    """RandAugment's fill for pixels moved in from outside (the normalization mean, as timm)."""
    region_decode: bool = True
    flip: float = 0.5
    """Train: horizontal flip probability (0 never, 1 always)."""

    def __post_init__(self) -> None:
        self.ra_spec = parse_rand_augment(self.rand_augment)  # ValueError on a bad spec
        self.eval_view = Preprocessor.for_model("beit", self.image_size, crop_pct=self.crop_pct)

    def __call__(self, data: bytes, key: str, epoch: int = 0) -> np.ndarray:
        s = self.image_size
        if self.train:
            rng = image_rng(self.seed, epoch, key)
            flip = draw_flip(rng, self.flip)

            def box(w: int, h: int) -> tuple[float, float, float, float]:
                i, j, ch, cw = sample_crop(rng, w, h, self.crop_scale, self.crop_ratio)
                j = w - j - cw if flip else j
                return j, i, j + cw, i + ch

            img, b = decode_region(data, box, s, self.max_pixels, self.draft, self.region_decode)
            x = resize_box(img, b, s)  # [3, S, S] uint8
            if self.ra_spec is None:
                return to_chw(x, flip)
            pil = Image.fromarray(to_chw(x, flip).transpose(1, 2, 0))  # [S, S, 3]
            pil = apply_rand_augment(pil, self.ra_spec, rng, tuple(self.fill))
            return np.ascontiguousarray(np.asarray(pil).transpose(2, 0, 1))
        # Decoded whole and resized by Pillow exactly as labelling and serving do (no draft
        # decode, no torch resize): the same pixels, hence the same predictions.
        return self.eval_view.to_uint8(decode_image(data, self.max_pixels))  # [3, S, S]
