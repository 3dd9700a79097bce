"""The learning-rate schedule, per optimizer step: linear warmup, then cosine or poly decay.

cosine is BEiT's (unilm ``utils.cosine_scheduler``): warmup to the peak, then half a cosine to
``min_lr``. poly is mmseg's (``policy='poly', warmup='linear'``, as unilm's UperNet configs):
``(peak - min) * (1 - step / total) ** power + min`` over the whole run, multiplied during
warmup by a factor rising linearly from ``WARMUP_RATIO`` to 1. Either way ``min_lr`` is
clamped to the peak, so a small batch (whose linearly scaled peak falls below an absolute
``min_lr``) never makes the lr rise after warmup.

    lr = lr_at(step, total, cfg)   # cfg: a PretrainConfig / FinetuneConfig
"""

from __future__ import annotations

import math

from beit_ray.train.config import TrainConfig, recipe

WARMUP_RATIO = 1e-6
"""mmseg's warmup_ratio: the poly schedule's first step runs at this share of its lr."""


def cosine_lr(step: int, total: int, peak: float, low: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine to ``low`` at ``total``."""
    low = min(low, peak)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(1, total - warmup), 1.0)
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))


def poly_lr(
    step: int, total: int, peak: float, low: float, warmup: int, power: float = 1.0
) -> float:
    """mmseg's poly decay over the whole run, with linear warmup from ``WARMUP_RATIO``."""
    low = min(low, peak)
    lr = (peak - low) * (1 - min(step, total) / max(1, total)) ** power + low
    if step < warmup:
        lr *= 1 - (1 - step / warmup) * (1 - WARMUP_RATIO)
    return lr


def steps_per_epoch(cfg: TrainConfig, total: int) -> float | None:
    """Optimizer steps per epoch of a run ``total`` steps long; None when run.max_steps, not
    run.epochs, sets the length."""
    return None if cfg.run.max_steps else total / cfg.run.epochs


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """Warmup length: optim.warmup_steps, else optim.warmup_epochs, else the task's recipe
    capped at optim.warmup_fraction of the run; never longer than the run."""
    o = cfg.optim
    per_epoch = steps_per_epoch(cfg, total)
    if o.warmup_steps is not None:
        return min(o.warmup_steps, total)
    if o.warmup_epochs is not None:  # config validation: per_epoch is known here
        return min(round(o.warmup_epochs * (per_epoch or 0)), total)
    r = recipe(cfg.task_name, cfg.model.flavour)
    cap = int(o.warmup_fraction * total)
    if r.warmup_steps is not None:
        return min(r.warmup_steps, cap)
    if per_epoch is None or r.warmup_epochs is None:
        return cap
    return min(round(r.warmup_epochs * per_epoch), cap)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """The lr of optimizer step ``step`` (0-based) of ``total``, before layer-decay scaling."""
    o, warmup = cfg.optim, warmup_steps(cfg, total)
    if o.schedule == "poly":
        return poly_lr(step, total, cfg.peak_lr, o.min_lr, warmup, o.poly_power)
    return cosine_lr(step, total, cfg.peak_lr, o.min_lr, warmup)
