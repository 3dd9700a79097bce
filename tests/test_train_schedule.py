"""The lr schedule (beit_ray/train/schedule.py) and BEiT's per-task defaults (train/config.py)."""

from __future__ import annotations

import pytest

from beit_ray.config import ConfigError, build
from beit_ray.train.config import FinetuneConfig, PretrainConfig
from beit_ray.train.deepspeed import deepspeed_config
from beit_ray.train.schedule import WARMUP_RATIO, cosine_lr, lr_at, poly_lr, warmup_steps


def finetune(**tree: object) -> FinetuneConfig:
    return build(FinetuneConfig, tree)


def test_cosine_warms_up_linearly_then_decays_to_min():
    lrs = [cosine_lr(s, 100, 1.0, 0.1, 10) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # (s + 1) / warmup
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[55] == pytest.approx(0.55) and lrs[100] == pytest.approx(0.1)


def test_poly_is_mmsegs_linear_warmup_then_linear_to_zero():
    peak, total, warm = 7e-4, 1000, 150
    lrs = [poly_lr(s, total, peak, 0.0, warm) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(peak * WARMUP_RATIO)  # mmcv: regular lr × warmup_ratio
    regular = [peak * (1 - s / total) for s in range(total + 1)]
    k = 75
    assert lrs[k] == pytest.approx(regular[k] * (1 - (1 - k / warm) * (1 - WARMUP_RATIO)))
    assert lrs[warm:] == pytest.approx(regular[warm:])  # poly over the whole run, from step 0
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm], strict=False))  # rising
    assert lrs[total] == 0.0 and min(lrs) >= 0
    square = [poly_lr(s, total, peak, 0.0, 0, power=2.0) for s in (0, 500)]
    assert square == pytest.approx([peak, peak / 4])


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_min_lr_never_above_the_peak(task):
    # 1 worker × 2 images: segmentation's peak 7e-4 × 2 / 16 = 8.75e-5; classification's
    # 4e-3 × 2 / 1024 = 7.8e-6. A min_lr of 1e-4 above either must not make the lr rise.
    cfg = finetune(
        task=task,
        optim={"min_lr": 1e-4},
        deepspeed={"micro_batch_size": 2},
        scaling={"num_workers": 1},
        run={"epochs": 2},
    )
    assert cfg.peak_lr < cfg.optim.min_lr
    lrs = [lr_at(s, 200, cfg) for s in range(200)]
    w = warmup_steps(cfg, 200)
    assert max(lrs) <= cfg.peak_lr * (1 + 1e-9)
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1 :], strict=False))


def test_warmup_lengths():
    cls = finetune(run={"epochs": 100})  # 20 of 100 epochs: BEiT's recipe, under the 0.2 cap
    assert warmup_steps(cls, 1000) == 200
    short = finetune(run={"epochs": 10})  # 20 epochs would be the whole run: capped at 20%
    assert warmup_steps(short, 1000) == 200 and warmup_steps(short, 10) == 2
    seg = finetune(task="segmentation", run={"epochs": 100})
    assert warmup_steps(seg, 160_000) == 1500 and warmup_steps(seg, 1000) == 200
    pre = build(PretrainConfig, {"run": {"epochs": 800}})
    assert warmup_steps(pre, 8000) == 100  # 10 epochs of 10 steps
    exact = finetune(optim={"warmup_steps": 700}, run={"epochs": 10})
    assert warmup_steps(exact, 1000) == 700 and warmup_steps(exact, 300) == 300
    by_epoch = finetune(optim={"warmup_epochs": 5}, run={"epochs": 10})
    assert warmup_steps(by_epoch, 1000) == 500  # explicit: not capped
    capped_run = finetune(run={"max_steps": 50})
    assert warmup_steps(capped_run, 50) == 10
    with pytest.raises(ConfigError, match=r"^optim\.warmup_epochs"):
        finetune(optim={"warmup_epochs": 5}, run={"max_steps": 50})


def test_recipe_defaults_per_task():
    pre = build(PretrainConfig, {})
    o = pre.optim
    assert (o.base_lr, o.base_batch, o.min_lr, o.schedule) == (1.5e-3, 2048, 1e-5, "cosine")
    assert o.betas == (0.9, 0.999) and o.clip_grad == 3.0 and o.layer_decay == 1.0
    assert deepspeed_config(pre)["gradient_clipping"] == 3.0

    cls = finetune().optim
    assert (cls.base_lr, cls.base_batch, cls.min_lr, cls.schedule) == (4e-3, 1024, 1e-6, "cosine")
    assert (cls.mixup, cls.cutmix, cls.label_smoothing, cls.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert cls.betas == (0.9, 0.999) and cls.clip_grad == 0.0 and cls.layer_decay == 0.65
    assert deepspeed_config(finetune())["gradient_clipping"] == 0.0
    large = finetune(model={"flavour": "large"}).optim
    assert (large.base_lr, large.layer_decay) == (1e-3, 0.75)
    big = finetune(
        model={"flavour": "base"}, deepspeed={"micro_batch_size": 128}, scaling={"num_workers": 8}
    )
    assert big.peak_lr == pytest.approx(4e-3)  # the recipe's own batch: 8 × 128

    seg = finetune(task="segmentation").optim
    assert (seg.base_lr, seg.base_batch, seg.min_lr, seg.schedule) == (7e-4, 16, 0.0, "poly")
    assert seg.clip_grad == 0.0 and seg.layer_decay == 0.65 and seg.poly_power == 1.0

    mine = finetune(
        optim={"base_lr": 1e-3, "mixup": 0.0, "min_lr": 0.0, "schedule": "poly", "layer_decay": 1}
    ).optim
    assert (mine.base_lr, mine.mixup, mine.cutmix, mine.min_lr, mine.schedule) == (
        1e-3, 0.0, 1.0, 0.0, "poly"
    )  # fmt: skip
    assert mine.layer_decay == 1.0
    with pytest.raises(ConfigError, match=r"^optim\.base_lr"):
        finetune(optim={"base_lr": -1})
