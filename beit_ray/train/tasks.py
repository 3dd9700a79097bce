"""What differs between pretraining and fine-tuning: the model, a batch's loss and metrics, eval.

A task turns a batch of uint8 rows into a loss (normalising on the worker, where it is cheap)
and reduces validation metrics over all ranks. The loop in :mod:`beit_ray.train.loop` is the
same for every task.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from beit_ray.data.augment import MEANS, STDS
from beit_ray.data.segmentation import (  # slide_logits lived here: still importable
    pad_normalized,
    segment_logits,
    slide_logits,  # noqa: F401
)
from beit_ray.train.config import FinetuneConfig, PretrainConfig, TrainConfig

HEAD_INIT_SCALE = 1e-3
"""BEiT fine-tuning scales a new classification head by 0.001 (unilm --init_scale)."""


class Task:
    """Base: pixels → normalised floats, model construction shared by all tasks."""

    name: str = ""
    dtypes: dict[str, torch.dtype] = {}
    score: str | None = None
    """Validation metric that picks the best checkpoint (higher is better); None: keep latest."""

    def __init__(self, cfg: TrainConfig, extra: dict[str, Any]) -> None:
        self.cfg, self.extra = cfg, extra
        kind = getattr(cfg.data, "normalization", "beit")  # the data pipeline's own tables
        mean, std = MEANS[kind], STDS[kind]
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255
        self.dtype = torch.float32

    def pixels(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 [B, 3, H, W] → normalised [B, 3, H, W] in the engine's dtype."""
        x = (x.to(device).float() - self.mean.to(device)) / self.std.to(device)
        return x.to(self.dtype)

    def build(self, zero3_config: dict[str, Any] | None) -> nn.Module:
        import deepspeed

        from beit_ray.models.load import build_or_load

        m = self.cfg.model
        keys = ("image_size", "drop_path")  # drop_path also overrides a checkpoint's rate
        overrides = {k: getattr(m, k) for k in keys if getattr(m, k) is not None}
        if not m.init_from:  # flavour knobs only apply to a new model
            overrides.update(
                {
                    k: getattr(m, k)
                    for k in ("vocab_size", "layer_scale")
                    if getattr(m, k) is not None
                }
            )
        overrides.update(self.model_kwargs())
        return build_or_load(
            m.flavour,
            self.name,
            init_from=m.init_from,
            zero3_config=zero3_config,
            storage=self.cfg.storage,
            seed=self.cfg.run.seed,
            # unilm's init of a new model rescales ZeRO-3-partitioned weights: gather them for it
            gather=lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=0),
            **overrides,
        )

    def model_kwargs(self) -> dict[str, Any]:
        """Config kwargs of the task's model: the class names when the task has labelled data."""
        labels = self.extra.get("id2label")
        return {"id2label": labels, "num_labels": len(labels)} if labels else {}

    def layer_decay(self) -> float:
        return self.cfg.optim.layer_decay or 1.0

    def loss(
        self, engine: Any, batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics as detached 0-d device tensors) of a batch, through ``engine(...)``.

        Nothing here waits on the device: metrics are read on logging steps only."""
        raise NotImplementedError

    def evaluate(self, engine: Any, shard: Any, batch_size: int) -> dict[str, float]:
        """Metrics over every rank's share of the validation data (all ranks call this)."""
        return {}


class MimTask(Task):
    """Masked image modelling: cross-entropy of visual tokens on masked patches only."""

    name = "mim"
    dtypes = {
        "pixel_values": torch.uint8,
        "bool_masked_pos": torch.bool,
        "visual_token_ids": torch.int64,
    }

    def build(self, zero3_config: dict[str, Any] | None) -> nn.Module:
        from beit_ray.models.mim import masked_only

        return masked_only(super().build(zero3_config))  # engine(..., token_ids=) is the step

    @property
    def num_masked(self) -> int:
        """Slots per image for masked patches: the data's masking count (never exceeded)."""
        return self.cfg.data.masking_patches

    def loss(
        self, engine: Any, batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from beit_ray.models.mim import mlm_accuracy

        dev = engine.device
        x = self.pixels(batch["pixel_values"], dev)  # [B, 3, H, W]
        mask = batch["bool_masked_pos"].to(dev)  # [B, N]
        if not getattr(self, "_mask_checked", False):  # one host wait, on the first batch only
            most = int(mask.sum(1).max())
            if most > self.num_masked:
                raise ValueError(
                    f"the data masks {most} patches in an image, more than "
                    f"data.num_masking_patches = {self.num_masked}: set it to the data's count"
                )
            self._mask_checked = True
        tokens = batch["visual_token_ids"].to(dev)  # [B, N]
        loss, logits, labels = engine(
            pixel_values=x, bool_masked_pos=mask, token_ids=tokens, num_masked=self.num_masked
        )
        return loss, {"loss": loss.detach(), "mlm_acc": mlm_accuracy(logits, labels)}


class ClassificationTask(Task):
    """Mean-pooled BEiT + linear head; soft-target CE with label smoothing, mixup/cutmix."""

    name = "classification"
    dtypes = {"pixel_values": torch.uint8, "label": torch.int64}
    score = "top1"

    def build(self, zero3_config: dict[str, Any] | None) -> nn.Module:
        model = super().build(zero3_config)
        if not self.cfg.model.init_from:  # a loaded checkpoint's new head is scaled by load_model
            import deepspeed

            head = list(model.classifier.parameters())
            with deepspeed.zero.GatheredParameters(head, modifier_rank=0), torch.no_grad():
                for p in head:
                    p.mul_(HEAD_INIT_SCALE)
        return model

    def layer_decay(self) -> float:
        from beit_ray.models.flavours import get_flavour

        return self.cfg.optim.layer_decay or get_flavour(self.cfg.model.flavour).layer_decay

    def loss(
        self, engine: Any, batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o, dev = self.cfg.optim, engine.device
        x = self.pixels(batch["pixel_values"], dev)
        y = batch["label"].to(dev)  # [B]
        n = len(self.extra["id2label"])
        # Label-smoothed one-hot [B, C]; scatter, as F.one_hot reads the labels' range on the host.
        low = o.label_smoothing / n
        target = torch.full((len(y), n), low, device=dev).scatter_(
            1, y[:, None], 1 - o.label_smoothing + low
        )
        x = random_erase(x, o.reprob, gen)  # per image, before mixing (timm's order)
        x, target = mix(x, target, o.mixup, o.cutmix, gen)
        logits = engine(pixel_values=x).logits.float()  # [B, C]
        loss = torch.sum(-target * F.log_softmax(logits, -1), -1).mean()
        acc = (logits.detach().argmax(-1) == y).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc}

    @torch.no_grad()
    def evaluate(self, engine: Any, shard: Any, batch_size: int) -> dict[str, float]:
        dev = engine.device
        sums = torch.zeros(3, dtype=torch.float64)  # top1 hits, top5 hits, count
        for b in shard.iter_torch_batches(batch_size=batch_size, dtypes=self.dtypes):
            logits = engine(pixel_values=self.pixels(b["pixel_values"], dev)).logits.float().cpu()
            top = logits.topk(min(5, logits.shape[-1]), -1).indices  # [B, k]
            y = b["label"].view(-1, 1)
            sums += torch.tensor(
                [(top[:, :1] == y).sum(), (top == y).any(-1).sum(), len(y)], dtype=torch.float64
            )
        sums = all_reduce_on(sums, dev)
        return {
            "top1": (sums[0] / sums[2].clamp(min=1)).item(),
            "top5": (sums[1] / sums[2].clamp(min=1)).item(),
        }


class SegmentationTask(Task):
    """UperNet (+ auxiliary FCN) on BEiT; mIoU and pixel accuracy by mmseg's slide test."""

    name = "segmentation"
    dtypes = {"pixel_values": torch.uint8, "labels": torch.uint8, "valid_hw": torch.int32}
    score = "miou"

    def layer_decay(self) -> float:
        return self.cfg.optim.layer_decay or 0.9

    def loss(
        self, engine: Any, batch: dict[str, torch.Tensor], gen: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        dev = engine.device
        labels = batch["labels"].to(dev).long()  # [B, H, W], 255 = ignored
        x = pad_normalized(self.pixels(batch["pixel_values"], dev), batch["valid_hw"])
        out = engine(pixel_values=x, labels=labels)
        with torch.no_grad():
            pred = F.interpolate(
                out.logits.float(), size=labels.shape[-2:], mode="bilinear"
            ).argmax(1)
            valid = labels != 255
            acc = ((pred == labels) & valid).sum() / valid.sum().clamp(min=1)
        return out.loss, {"loss": out.loss.detach(), "pixel_acc": acc}

    @torch.no_grad()
    def evaluate(self, engine: Any, shard: Any, batch_size: int) -> dict[str, float]:
        n = len(self.extra["id2label"])
        crop = int(engine.module.config.image_size)
        conf = torch.zeros(n, n, dtype=torch.float64)  # [true, pred]
        # Test-scale images differ in shape: one image per batch.
        for b in shard.iter_batches(batch_size=1, batch_format="numpy"):
            x = torch.from_numpy(
                np.ascontiguousarray(np.asarray(b["pixel_values"][0], dtype=np.uint8))
            )[None]  # [1, 3, h, w] at the test scale
            y = torch.from_numpy(np.asarray(b["labels"][0], dtype=np.int64))  # [H, W] original
            logits = segment_logits(
                lambda v: engine(pixel_values=v).logits.float(),
                self.pixels(x, engine.device),
                crop,
                n,
                tuple(y.shape),
            )  # [1, C, H, W]
            pred, y = logits.argmax(1).cpu().flatten(), y.flatten()
            ok = y != 255
            conf += torch.bincount(y[ok] * n + pred[ok], minlength=n * n).view(n, n).double()
        conf = all_reduce_on(conf, engine.device)
        return segmentation_metrics(conf)


def all_reduce_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum ``t`` over ranks on ``device`` (the engine's: an NCCL group has no CPU backend)."""
    out = t.to(device)
    dist.all_reduce(out)
    return out.to(t.device)


def segmentation_metrics(conf: torch.Tensor) -> dict[str, float]:
    """mIoU over classes present (in labels or predictions) and pixel accuracy from [C, C]."""
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    miou = (inter[present] / union[present]).mean().item() if present.any() else 0.0
    return {"miou": miou, "pixel_acc": (inter.sum() / conf.sum().clamp(min=1)).item()}


def mix(
    x: torch.Tensor, target: torch.Tensor, mixup: float, cutmix: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix of a batch with its reverse (as timm), drawn from ``gen``."""
    if mixup <= 0 and cutmix <= 0:
        return x, target
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    flipped = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1, x0, x1 = (
            max(cy - ch // 2, 0),
            min(cy + ch // 2, h),
            max(cx - cw // 2, 0),
            min(cx + cw // 2, w),
        )
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + flipped * (1 - lam)
    return x, target * lam + target.flip(0) * (1 - lam)


def random_erase(
    x: torch.Tensor,
    prob: float,
    gen: torch.Generator,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> torch.Tensor:
    """timm ``RandomErasing(mode='pixel', count 1)`` on a normalized batch [B, C, H, W], in place.

    Each image, with probability ``prob``, gets one box of ``area`` × H·W pixels (log-uniform
    ``aspect`` h/w; up to ``attempts`` tries to fit strictly inside) filled with per-pixel
    N(0, 1) noise: noise in normalized space, i.e. around the dataset mean. Drawn from ``gen``.
    """
    if prob <= 0:
        return x
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    b, c, h, w = x.shape
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for i in range(b):
        if rng.random() > prob:
            continue
        for _ in range(attempts):
            target = rng.uniform(*area) * h * w
            ratio = math.exp(rng.uniform(*log_aspect))
            eh, ew = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if ew < w and eh < h:
                top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                noise = torch.from_numpy(rng.standard_normal((c, eh, ew), dtype=np.float32))
                x[i, :, top : top + eh, left : left + ew] = noise.to(x.device, x.dtype)
                break
    return x


def make_task(cfg: TrainConfig, extra: dict[str, Any] | None = None) -> Task:
    """The task object for a job config (``extra`` carries e.g. id2label found by the driver)."""
    extra = extra or {}
    if isinstance(cfg, PretrainConfig):
        return MimTask(cfg, extra)
    if isinstance(cfg, FinetuneConfig):
        return (ClassificationTask if cfg.task == "classification" else SegmentationTask)(
            cfg, extra
        )
    raise TypeError(f"no task for {type(cfg).__name__}")
