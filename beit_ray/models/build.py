"""Build a transformers model for a task from a flavour, ZeRO-3-safe.

Under ZeRO-3 the weights must be partitioned as they are created, or every rank briefly holds
the whole model. transformers does that itself when an ``HfDeepSpeedConfig`` is alive while the
model is built with ``_from_config``, and it keeps transformers' own initialisation (building
inside a bare ``deepspeed.zero.Init`` would skip it: std 0.059 instead of 0.02).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn
from transformers import (
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitForSemanticSegmentation,
    BeitModel,
    PretrainedConfig,
    ViTForImageClassification,
    ViTModel,
)

from beit_ray.models.flavours import Task, model_config

MODEL_CLASSES: dict[tuple[str, str], type] = {
    ("beit", "mim"): BeitForMaskedImageModeling,
    ("beit", "classification"): BeitForImageClassification,
    ("beit", "segmentation"): BeitForSemanticSegmentation,
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
) -> nn.Module:
    """A freshly initialised model; pass the DeepSpeed config dict when it uses ZeRO stage 3."""
    cls = model_class(config, task)
    config = copy.deepcopy(config)  # _from_config mutates the config it is given
    if zero3_config is not None and zero3_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(zero3_config)  # noqa: F841 (read through a weakref)
        model = cls._from_config(config, attn_implementation=attn_implementation)
        del keep_alive
        return model
    return cls._from_config(config, attn_implementation=attn_implementation)


def build_model(
    flavour: str,
    task: Task,
    *,
    zero3_config: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    **config_overrides: Any,
) -> nn.Module:
    """``build_model("debug", "mim")``: a new model of a named flavour for a task."""
    config = model_config(flavour, task, **config_overrides)
    return build_from_config(
        config, task, zero3_config=zero3_config, attn_implementation=attn_implementation
    )
