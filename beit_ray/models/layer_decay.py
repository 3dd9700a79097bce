"""Layer-wise learning-rate decay parameter groups (BEiT fine-tuning).

Follows microsoft/unilm ``beit/optim_factory.py``: with L blocks, the embeddings (patch
embedding, cls/mask token, position embeddings) are layer 0, block i is layer i + 1, and
everything else (final norm, pooler, heads, UperNet decoder, the shared relative position
bias) is the top layer L + 1; layer j's learning rate is scaled by ``decay ** (L + 1 - j)``.

Weight decay as unilm's pretraining and fine-tuning both apply it: none on 1-D parameters
(biases, norms, layer-scale lambdas) and on what ``no_weight_decay()`` returns there,
``{'pos_embed', 'cls_token'}``; so the mask token and the relative position tables (shared in
pretraining, per block in fine-tuning) are decayed. ``decay_rel_pos=False`` is unilm
fine-tuning's ``--disable_weight_decay_on_rel_pos_bias`` (off in its published recipes).
No optimizer is built here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

# Encoder names with or without the task model's prefix (beit./vit.); v4 names included.
_BLOCK = re.compile(r"^(?:beit\.|vit\.)?(?:encoder\.)?(?:layers|layer)\.(\d+)\.")
_EMBEDDING = re.compile(r"^(?:beit\.|vit\.)?embeddings\.")
_NO_DECAY = ("cls_token", "position_embeddings")  # unilm: pos_embed, cls_token
_REL_POS = "relative_position_bias_table"


def num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ValueError("param_groups needs a transformers model with config.num_hidden_layers")
    return int(config.num_hidden_layers)


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for block i, ``depth + 1`` for everything else."""
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    if _EMBEDDING.match(name):
        return 0
    return depth + 1


def no_weight_decay(name: str, param: nn.Parameter, extra: Iterable[str] = ()) -> bool:
    # a ZeRO-3 partition is a flat [0] tensor; its real shape is ds_shape
    ndim = len(getattr(param, "ds_shape", param.shape))
    return ndim <= 1 or name.endswith(".bias") or any(k in name for k in (*_NO_DECAY, *extra))


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float,
    no_decay_extra: Iterable[str] = (),
    decay_rel_pos: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer groups keyed by (layer, decay / no decay).

    ``decay_rel_pos=False`` exempts relative position tables from weight decay.

    Each group has "params", "param_names", "weight_decay", "lr_scale", "lr" (= lr * lr_scale)
    and "layer_id". Frozen parameters (requires_grad False) are left out.
    """
    depth = num_layers(model)
    extra = tuple(no_decay_extra) + (() if decay_rel_pos else (_REL_POS,))
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        skip = no_weight_decay(name, param, extra)
        key = (layer, skip)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if skip else weight_decay,
                "lr_scale": scale,
                "lr": lr * scale,
                "layer_id": layer,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
