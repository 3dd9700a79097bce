"""Build a transformers model for a task from a flavour, ZeRO-3-safe.

Under ZeRO-3 the weights must be partitioned as they are created, or every rank briefly holds
the whole model. transformers does that itself when an ``HfDeepSpeedConfig`` is alive while the
model is built with ``_from_config``, and it keeps transformers' own initialisation (building
inside a bare ``deepspeed.zero.Init`` would skip it: std 0.059 instead of 0.02). New BEiT models
are then re-initialised as unilm does (:mod:`beit_ray.models.init`); partitioned weights are
made whole for that by the ``gather`` callable the training layer passes.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitModel,
    PretrainedConfig,
    ViTForImageClassification,
    ViTModel,
)

from beit_ray.models.flavours import Task, model_config
from beit_ray.models.init import Gather, init_beit_like_unilm
from beit_ray.models.segmentation import BeitForSemanticSegmentation

MODEL_CLASSES: dict[tuple[str, str], type] = {
    ("beit", "mim"): BeitForMaskedImageModeling,
    ("beit", "classification"): BeitForImageClassification,
    ("beit", "segmentation"): BeitForSemanticSegmentation,  # taps blocks, not blocks - 1
    ("beit", "features"): BeitModel,
    ("vit", "classification"): ViTForImageClassification,
    ("vit", "features"): ViTModel,
}


def model_class(config: PretrainedConfig, task: Task) -> type:
    key = (config.model_type, task)
    if key not in MODEL_CLASSES:
        raise ValueError(f"no {task} model for model_type {config.model_type!r}")
    return MODEL_CLASSES[key]


def build_from_config(
    config: PretrainedConfig,
    task: Task,
    *,
    zero3_config: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    init: Literal["unilm", "transformers"] = "unilm",
    seed: int | None = None,
    gather: Gather | None = None,
) -> nn.Module:
    """A freshly initialised model; pass the DeepSpeed config dict when it uses ZeRO stage 3.

    ``init="unilm"`` re-initialises BEiT as the paper's code (trunc-normal 0.02, block l's output
    projections / sqrt(2 l)), drawing from ``seed`` (default: from torch's global RNG, so a
    ``torch.manual_seed`` before the call fixes it); under ZeRO-3 it needs ``gather``.
    ``"transformers"`` keeps transformers' own init (for weights that are overwritten anyway).
    """
    cls = model_class(config, task)
    config = copy.deepcopy(config)  # _from_config mutates the config it is given
    if zero3_config is not None and zero3_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(zero3_config)  # noqa: F841 (read through a weakref)
        model = cls._from_config(config, attn_implementation=attn_implementation)
        del keep_alive
    else:
        model = cls._from_config(config, attn_implementation=attn_implementation)
    if init == "unilm":
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator().manual_seed(seed)
        init_beit_like_unilm(model, task, generator=generator, gather=gather)
    elif init != "transformers":
        raise ValueError(f"unknown init {init!r}; use 'unilm' or 'transformers'")
    return model


def build_model(
    flavour: str,
    task: Task,
    *,
    zero3_config: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
    gather: Gather | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """``build_model("debug", "mim")``: a new model of a named flavour for a task, unilm init."""
    config = model_config(flavour, task, **config_overrides)
    return build_from_config(
        config,
        task,
        zero3_config=zero3_config,
        attn_implementation=attn_implementation,
        seed=seed,
        gather=gather,
    )
