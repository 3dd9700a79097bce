"""Eval equals inference: the labelling job, run with a fine-tuned run's exported model over the
run's validation images, scores the top-1 the run reported (real Ray Train + DeepSpeed on CPU)."""

from __future__ import annotations

import os
import shutil

import pytest
from test_train_finetune import write_digits

from beit_ray.config import build, parse_args
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.label import label, read_parts
from beit_ray.train.config import FinetuneConfig
from beit_ray.train.trainer import run_finetuning

pytestmark = pytest.mark.integration


def split_digits(root: str, n_val: int = 200) -> tuple[str, str]:
    """scikit-learn's digits as train/ and val/ class folders; val gets every 4th image up to
    ``n_val`` (even, so two workers' equal shares of it drop nothing)."""
    digits = write_digits(os.path.join(root, "all"))
    picked = 0
    for cls in sorted(os.listdir(digits)):
        for i, name in enumerate(sorted(os.listdir(os.path.join(digits, cls)))):
            to_val = i % 4 == 0 and picked < n_val
            picked += to_val
            dst = os.path.join(root, "val" if to_val else "train", cls)
            os.makedirs(dst, exist_ok=True)
            shutil.move(os.path.join(digits, cls, name), os.path.join(dst, name))
    return os.path.join(root, "train"), os.path.join(root, "val")


def test_labelling_the_validation_set_scores_the_runs_top1(ray_session, tmp_path) -> None:
    train, val = split_digits(str(tmp_path / "digits"))
    cfg = build(
        FinetuneConfig,
        {
            "data": {"source": train, "crop_scale": [0.7, 1.0], "rand_augment": ""},
            "val_source": val,
            "optim": {"lr": 1e-2, "warmup_steps": 10, "reprob": 0.0, "mixup": 0, "cutmix": 0},
            "deepspeed": {"micro_batch_size": 16, "zero_stage": 2},
            "run": {"epochs": 3, "log_every": 30},
            "checkpoint": {"storage_path": str(tmp_path / "runs"), "name": "eq", "keep_last": 1},
        },
    )
    result = run_finetuning(cfg)
    run_top1 = result.metrics["top1"]  # the eval of the checkpoint that was exported

    out = str(tmp_path / "labels")
    argv = ["--input", val, "--output", out, "--checkpoint", result.model_uri]
    argv += ["--task", "classify", "--ray.num_cpus", "4", "--actors.num_cpus", "0.5"]
    summary = label(parse_args(LabelConfig, argv))
    rows = read_parts(out).to_pandas()
    assert summary["errors"] == 0 and len(rows) == 200
    truth = rows["path"].map(lambda p: os.path.basename(os.path.dirname(p)))
    label_top1 = float((rows["top_labels"].map(lambda t: t[0]) == truth).mean())
    # A model that learned something (chance: 0.1; 0.225 here) and predicts several classes,
    # so agreement is not that of a constant predictor.
    assert run_top1 > 0.15 and rows["top_labels"].map(lambda t: t[0]).nunique() >= 3, run_top1
    assert abs(label_top1 - run_top1) <= 0.005, (label_top1, run_top1)
