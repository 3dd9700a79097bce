"""Image preprocessing equal to transformers' BEiT/ViT image processors, fast on uint8.

Built from a ``preprocessor_config.json`` (BeitImageProcessor / ViTImageProcessor semantics):
resize with PIL on uint8 (as transformers' PIL backend does), center crop, rescale, normalize.
Two halves so data and serving can ship uint8 and normalize late, in one fused torch op:
:meth:`Preprocessor.to_uint8` (resize + crop → uint8 [3, H, W], numpy and PIL only: decode tasks
never import torch, which costs each fresh Ray worker ~1.6 s of CPU) and
:meth:`Preprocessor.normalize`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from beit_ray.config import StorageConfig

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "preprocessor_config.json"
# Defaults of transformers 5's processors for keys a config leaves out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "beit": {"resample": 3, "do_center_crop": False, "do_reduce_labels": False},
    "vit": {"resample": 2, "do_center_crop": False, "do_reduce_labels": False},
}
_TYPES = {"beit": "BeitImageProcessor", "vit": "ViTImageProcessor"}


def _size_dict(size: Any) -> dict[str, int]:
    """transformers' size forms (int, [h, w], dict) → {"height", "width"} or {"shortest_edge"...}."""
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (list, tuple)):
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict):
        keys = set(size)
        if (
            keys == {"height", "width"}
            or keys <= {"shortest_edge", "longest_edge"}
            and "shortest_edge" in keys
        ):
            return {k: int(v) for k, v in size.items()}
    raise ValueError(
        f"unsupported size {size!r}: use an int, {{height, width}} or {{shortest_edge}}"
    )


@dataclass(frozen=True)
class Preprocessor:
    """Resize → center crop → rescale → normalize, with transformers' image-processor semantics."""

    size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_reduce_labels: bool = False
    image_processor_type: str = "BeitImageProcessor"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> Preprocessor:
        kind = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "Beit")
        family = "vit" if kind.lower().startswith("vit") else "beit"
        merged = {**_DEFAULTS[family], **cfg}
        mean = merged.get("image_mean", 0.5)
        std = merged.get("image_std", 0.5)
        return cls(
            size=_size_dict(merged.get("size", 224)),
            resample=int(merged["resample"]),
            do_resize=bool(merged.get("do_resize", True)),
            do_center_crop=bool(merged.get("do_center_crop")),
            crop_size=_size_dict(merged.get("crop_size") or 224),
            do_rescale=bool(merged.get("do_rescale", True)),
            rescale_factor=float(merged.get("rescale_factor", 1 / 255)),
            do_normalize=bool(merged.get("do_normalize", True)),
            image_mean=tuple(
                float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)
            ),
            image_std=tuple(
                float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3)
            ),
            # older configs spell it reduce_labels
            do_reduce_labels=bool(
                merged.get("do_reduce_labels", merged.get("reduce_labels", False))
            ),
            image_processor_type=_TYPES[family],
        )

    @classmethod
    def from_pretrained(cls, uri: str, storage: StorageConfig | None = None) -> Preprocessor:
        """From preprocessor_config.json itself, a folder holding it, or a beit-ray run folder."""
        from beit_ray import storage as st
        from beit_ray.models.checkpoint import model_dir

        if str(uri).endswith(".json"):
            path = uri
        elif st.exists(st.join(uri, CONFIG_NAME), storage):
            path = st.join(uri, CONFIG_NAME)
        else:
            path = st.join(model_dir(uri, storage), CONFIG_NAME)
        if not st.exists(path, storage):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {uri}")
        return cls.from_dict(json.loads(st.read_text(path, storage)))

    @classmethod
    def for_model(
        cls,
        model_type: str,
        image_size: int,
        *,
        segmentation: bool = False,
        crop_pct: float | None = None,
        seg_scale: tuple[int, int] | None = None,
        **overrides: Any,
    ) -> Preprocessor:
        """The processor we export, which is also the fine-tuning run's eval transform.

        Classification (and MIM / features): BEiT's eval (unilm ``build_transform``): resize
        the shorter side to ``int(image_size / crop_pct)`` (bicubic), center-crop
        ``image_size``; ``crop_pct`` unset: :func:`eval_crop_pct`. Segmentation with
        ``seg_scale`` (long, short): mmseg's test rescale, ratio kept, as large as fits both
        edges (size {shortest_edge: short, longest_edge: long}, bilinear, no crop; the model
        then slides ``image_size`` windows); without: resize to ``image_size`` square
        (bilinear, as microsoft/beit-*-finetuned-ade-*)."""
        family = "vit" if model_type == "vit" else "beit"
        square = {"height": image_size, "width": image_size}
        cfg: dict[str, Any] = {
            "image_processor_type": _TYPES[family],
            "size": square,
            "crop_size": square,
            "resample": 2,
            "do_center_crop": False,
            "do_reduce_labels": bool(segmentation and family == "beit"),
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
        }
        if not segmentation:
            pct = eval_crop_pct(image_size) if crop_pct is None else crop_pct
            if not 0 < pct <= 1:
                raise ValueError(f"crop_pct must be in (0, 1], got {pct}")
            cfg.update(
                size={"shortest_edge": int(image_size / pct)}, resample=3, do_center_crop=True
            )
        elif seg_scale is not None:
            if len(seg_scale) != 2 or min(seg_scale) <= 0:
                raise ValueError(f"seg_scale must be two positive edges (long, short): {seg_scale}")
            cfg["size"] = {
                "shortest_edge": int(min(seg_scale)),
                "longest_edge": int(max(seg_scale)),
            }
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(cfg)

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json contents (AutoImageProcessor reads it back)."""
        out = asdict(self)
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        if self.image_processor_type == "ViTImageProcessor":
            out.pop("do_reduce_labels")  # transformers 5's ViT processors center-crop too
            if not self.do_center_crop:
                out.pop("do_center_crop"), out.pop("crop_size")
        return out

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    # ------------------------------------------------------------------ geometry
    @property
    def fixed_size(self) -> bool:
        """Every image comes out at one size (square resize or center crop): batches stack."""
        return self.do_center_crop or (self.do_resize and "height" in self.size)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the resize step, with transformers' rounding."""
        if not self.do_resize:
            return height, width
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        short_target = self.size["shortest_edge"]
        longest = self.size.get("longest_edge")
        short, long = (width, height) if width <= height else (height, width)
        if longest is not None:  # transformers' get_size_with_aspect_ratio
            raw = None
            if long / short * short_target > longest:
                raw = longest * short / long
                short_target = int(round(raw))
            if short == short_target:
                return height, width
            new_long = int((raw if raw is not None else short_target) * long / short)
        else:
            new_long = int(short_target * long / short)
        return (new_long, short_target) if width <= height else (short_target, new_long)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        return self.resized_size(height, width)

    def _geometry(self, image: np.ndarray, resample: int) -> np.ndarray:
        """Resize (PIL, on uint8) then center crop; HxW or HxWxC uint8 in and out."""
        h, w = image.shape[:2]
        nh, nw = self.resized_size(h, w)
        if (nh, nw) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((nw, nh), resample=resample))
        if self.do_center_crop:
            image = _center_crop(image, self.crop_size["height"], self.crop_size["width"])
        return image

    # ------------------------------------------------------------------ images
    def to_uint8(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 (or HxW, HxWx4) uint8 → resized, cropped uint8 [3, H, W]; not normalized."""
        image = _rgb(image)
        out = self._geometry(image, self.resample)
        return np.array(out.transpose(2, 0, 1), order="C")  # [3, H, W], a writable copy

    def normalize(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [B, 3, H, W] or [3, H, W] → float32, rescaled and normalized (one fused op)."""
        import torch

        pixels = torch.as_tensor(pixels)
        scale = self.rescale_factor if self.do_rescale else 1.0
        mean = torch.tensor(
            self.image_mean if self.do_normalize else (0.0,) * 3, dtype=torch.float32
        )
        std = torch.tensor(self.image_std if self.do_normalize else (1.0,) * 3, dtype=torch.float32)
        shape = (3, 1, 1) if pixels.ndim == 3 else (1, 3, 1, 1)
        mul = (scale / std).view(shape).to(pixels.device)
        add = (-mean / std).view(shape).to(pixels.device)
        return torch.addcmul(add, pixels.to(torch.float32), mul)

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        """HxWx3 uint8 images → float32 [B, 3, H, W] model input."""
        if len(images) == 0:
            raise ValueError("no images to preprocess")
        batch = [self.to_uint8(img) for img in images]
        if len({tuple(b.shape) for b in batch}) > 1:
            raise ValueError(
                "images come out at different sizes: set size {height, width} or a center crop"
            )
        return self.normalize(np.stack(batch))

    # ------------------------------------------------------------------ label maps
    @staticmethod
    def reduce_labels(seg_map: np.ndarray) -> np.ndarray:
        """ADE-style label reduction: 0 (background) → 255 (ignored), every other class − 1."""
        seg = np.asarray(seg_map).astype(np.int64)
        return np.where((seg == 0) | (seg == 255), 255, seg - 1).astype(np.uint8)

    def resize_label_map(
        self, seg_map: np.ndarray, size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Nearest-neighbour resize (+ center crop) of an HxW label map; to ``size`` if given."""
        seg = np.asarray(seg_map)
        if seg.dtype != np.uint8:
            if seg.max(initial=0) > 255 or seg.min(initial=0) < 0:
                raise ValueError("label maps must hold class ids in [0, 255]")
            seg = seg.astype(np.uint8)
        if size is not None:
            return np.asarray(
                Image.fromarray(seg).resize((size[1], size[0]), resample=Image.NEAREST)
            )
        return self._geometry(seg, Image.NEAREST)

    def label_map(self, seg_map: np.ndarray) -> torch.Tensor:
        """A segmentation target: reduced (if configured), resized like the image → int64 [H, W]."""
        import torch

        seg = self.reduce_labels(seg_map) if self.do_reduce_labels else seg_map
        return torch.from_numpy(self.resize_label_map(seg).astype(np.int64))


def eval_crop_pct(image_size: int) -> float:
    """BEiT's eval crop (unilm ``build_transform``): 224/256 below 384 px, 1.0 from 384 px on,
    the sizes BEiT fine-tunes at directly (no crop margin)."""
    return 224 / 256 if image_size < 384 else 1.0


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        return image[..., :3]
    raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")


def _center_crop(image: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """transformers' center_crop on HxW[xC]: zero-pads when the image is smaller than the crop."""
    h, w = image.shape[:2]
    if h < ch or w < cw:
        nh, nw = max(h, ch), max(w, cw)
        padded = np.zeros((nh, nw, *image.shape[2:]), dtype=image.dtype)
        top, left = -(-(nh - h) // 2), -(-(nw - w) // 2)  # ceil, as transformers
        padded[top : top + h, left : left + w] = image
        image, h, w = padded, nh, nw
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top : top + ch, left : left + cw]
