"""microsoft/unilm BEiT checkpoints (the paper's released ``.pth`` files) in transformers 5 names.

unilm saves ``{"model": state_dict, ...}`` (or ``"module"``; run_class_finetuning's
``--model_key model|module``) with timm-style names. The mapping follows transformers'
``convert_beit_unilm_to_pytorch.py``, written for transformers 5's module names:

- ``blocks.i.attn.qkv.weight`` [3D, D] → ``q_proj`` / ``k_proj`` / ``v_proj`` weights (rows in that
  order); ``attn.q_bias`` / ``attn.v_bias`` → ``q_proj.bias`` / ``v_proj.bias`` (k has no bias);
  ``attn.proj`` → ``o_proj``; ``norm1`` / ``norm2`` → ``layernorm_before`` / ``layernorm_after``;
  ``gamma_1`` / ``gamma_2`` → ``lambda_1`` / ``lambda_2``; ``mlp.fc1`` / ``mlp.fc2`` kept;
- ``rel_pos_bias.relative_position_bias_table`` (shared, pretraining) →
  ``beit.shared_position_bias...``; ``blocks.i.attn.relative_position_bias_table`` (per block,
  fine-tuned) → ``beit.layers.i.relative_position_bias...``; ``relative_position_index`` buffers
  are dropped (recomputed);
- ``cls_token``, ``mask_token``, ``pos_embed``, ``patch_embed.proj`` → ``beit.embeddings.*``;
- ``norm`` → the MIM head's ``layernorm`` (pretraining) or ``beit.layernorm`` (CLS pooling);
  ``fc_norm`` → ``beit.pooler.layernorm`` (mean pooling); ``lm_head`` kept; ``head`` →
  ``classifier``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import BeitConfig, PretrainedConfig

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "gamma_1": "lambda_1",
    "gamma_2": "lambda_2",
    "attn.q_bias": "attention.q_proj.bias",
    "attn.v_bias": "attention.v_proj.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_TOP_NAMES = {
    "cls_token": "beit.embeddings.cls_token",
    "mask_token": "beit.embeddings.mask_token",
    "pos_embed": "beit.embeddings.position_embeddings",
    "patch_embed.proj.weight": "beit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "beit.embeddings.patch_embeddings.projection.bias",
    "rel_pos_bias.relative_position_bias_table": (
        "beit.shared_position_bias.relative_position_bias_table"
    ),
    "fc_norm.weight": "beit.pooler.layernorm.weight",
    "fc_norm.bias": "beit.pooler.layernorm.bias",
    "lm_head.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
    "head.weight": "classifier.weight",
    "head.bias": "classifier.bias",
}


def unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The state dict inside a unilm checkpoint object (``model``/``module`` key) or itself."""
    if isinstance(obj, dict):
        for key in ("model", "module"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict: expected {name: tensor} or {'model'|'module': ...}")
    return obj


def is_unilm(state: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in state or any(k.startswith("blocks.0.") for k in state)


def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """unilm names → transformers 5 names with the ``beit.`` prefix (see module doc)."""
    mim = "lm_head.weight" in state
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            continue
        block = _BLOCK.match(key)
        if block:
            i, rest = block.groups()
            prefix = f"beit.layers.{i}."
            if rest == "attn.qkv.weight":
                q, k, v = value.chunk(3, dim=0)  # [3 D, D] → 3 x [D, D]
                out[prefix + "attention.q_proj.weight"] = q.clone()
                out[prefix + "attention.k_proj.weight"] = k.clone()
                out[prefix + "attention.v_proj.weight"] = v.clone()
            elif rest in _BLOCK_NAMES:
                out[prefix + _BLOCK_NAMES[rest]] = value
            else:
                unknown.append(key)
        elif key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
        elif key in ("norm.weight", "norm.bias"):
            out[("" if mim else "beit.") + "layer" + key] = value
        else:
            unknown.append(key)
    if unknown:
        out.update({f"unilm.{k}": state[k] for k in unknown})  # reported as unused by the loader
    return out


def config_from_state(state: dict[str, torch.Tensor]) -> tuple[PretrainedConfig, str]:
    """A BeitConfig and task read off a unilm state dict's shapes (unilm's norm eps 1e-6)."""
    proj = state["patch_embed.proj.weight"]  # [D, 3, p, p]
    hidden, patch = proj.shape[0], proj.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    shared = state.get("rel_pos_bias.relative_position_bias_table")
    own = state.get("blocks.0.attn.relative_position_bias_table")
    table = shared if shared is not None else own
    if table is not None:  # [(2 W - 1)^2 + 3, heads]
        heads = table.shape[1]
        window = (round((table.shape[0] - 3) ** 0.5) + 1) // 2
    elif "pos_embed" in state:  # [1, 1 + W^2, D]; heads are not in the weights
        heads, window = max(1, hidden // 64), round((state["pos_embed"].shape[1] - 1) ** 0.5)
    else:
        raise ValueError("unilm checkpoint without position tables: cannot tell its image size")
    if "lm_head.weight" in state:
        task, extra = "mim", {"vocab_size": state["lm_head.weight"].shape[0]}
    elif "head.weight" in state:
        task, extra = "classification", {"num_labels": state["head.weight"].shape[0]}
    else:
        task, extra = "features", {}
    config = BeitConfig(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
        patch_size=patch,
        image_size=window * patch,
        layer_norm_eps=1e-6,
        use_absolute_position_embeddings="pos_embed" in state,
        use_shared_relative_position_bias=shared is not None,
        use_relative_position_bias=own is not None,
        use_mask_token="mask_token" in state,
        use_mean_pooling="fc_norm.weight" in state,
        # the value is overwritten by the checkpoint; > 0 only makes the lambdas exist
        layer_scale_init_value=0.1 if "blocks.0.gamma_1" in state else 0.0,
        **extra,
    )
    return config, task
