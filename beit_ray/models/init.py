"""BEiT's from-scratch initialisation (microsoft/unilm ``beit/modeling_{pretrain,finetune}.py``).

transformers initialises BEiT with an untruncated normal and zero cls/mask tokens, and has no
depth rescale. unilm draws every linear and the patch projection (and the tokens) from a
truncated normal of std 0.02, then divides the output projections of block l (1-based; attention
``proj`` and MLP ``fc2``) by sqrt(2 l) (``fix_init_weight``), so the residual stream's growth
does not depend on depth. Its pretraining model truncates at +-1 std
(``trunc_normal_(t, std) = timm.trunc_normal_(t, std=std, a=-std, b=std)``: an actual std of
0.54 x 0.02); the fine-tuning model uses timm's default bounds +-2 (absolute, i.e. +-100 std).
Relative position tables start at zero, layer-scale lambdas at the config's value, norms at 1/0,
as transformers already does. Other task heads (UperNet's) get transformers' distribution
(normal of std ``initializer_range``, zero biases, norms 1/0) drawn from the same generator
(:func:`init_other_heads`), so their values do not depend on how transformers orders its draws
(under ZeRO-3 it orders them otherwise). The classification head is rescaled by the training
layer, as unilm's ``init_scale``.

ZeRO-3: partitioned weights hold no data on a rank; pass ``gather``, a callable that makes a
list of parameters whole for the duration of a ``with`` block and writes changes back
(``lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=0)`` from the training layer).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

STD = 0.02
Gather = Callable[[list[nn.Parameter]], AbstractContextManager[Any]]


def is_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_numel") for p in model.parameters())


def _whole(params: list[nn.Parameter], gather: Gather | None) -> AbstractContextManager[Any]:
    return gather(params) if gather is not None else contextlib.nullcontext()


def init_beit_like_unilm(
    model: nn.Module,
    task: str,
    *,
    generator: torch.Generator,
    gather: Gather | None = None,
) -> None:
    """Re-initialise a transformers BEiT task model in place as unilm does (see module doc)."""
    if getattr(model.config, "model_type", None) != "beit":
        return
    if is_partitioned(model) and gather is None:
        raise ValueError(
            "the model is ZeRO-3 partitioned: pass gather= (e.g. deepspeed.zero.GatheredParameters)"
        )
    bound = STD if task == "mim" else 2.0

    def normal(t: torch.Tensor) -> None:
        nn.init.trunc_normal_(t, std=STD, a=-bound, b=bound, generator=generator)

    beit = getattr(model, "beit", model)
    heads = [
        getattr(model, n) for n in ("lm_head", "classifier") if getattr(model, n, None) is not None
    ]
    with torch.no_grad():
        emb = beit.embeddings  # one gather per piece: never the whole model at once on a rank
        with _whole(list(emb.parameters()), gather):
            for name in ("cls_token", "mask_token", "position_embeddings"):
                p = getattr(emb, name, None)
                if isinstance(p, nn.Parameter):
                    normal(p)
            _init_modules(emb, normal)
        for i, layer in enumerate(beit.layers):
            with _whole(list(layer.parameters()), gather):
                _init_modules(layer, normal)
                # fix_init_weight: block l = i + 1 scales its residual-branch outputs by 1/sqrt(2 l)
                layer.attention.o_proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                layer.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
        for head in heads:
            with _whole(list(head.parameters()), gather):
                _init_modules(head, normal)
    init_other_heads(model, generator=generator, gather=gather)


OWN_INIT = ("beit", "vit", "lm_head", "classifier", "layernorm")
"""Top-level children that :func:`init_beit_like_unilm` (or a fixed value) initialises."""
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Embedding)


def transformers_value(
    module: nn.Module, name: str, shape: torch.Size, generator: torch.Generator, std: float
) -> torch.Tensor:
    """A new value of ``module``'s tensor ``name`` as transformers' ``_init_weights`` gives it,
    random draws from ``generator``: weights of linear/conv/embedding layers normal(0, std),
    norm weights and running variances 1, everything else (biases, running means) 0."""
    if name == "weight" and isinstance(module, _WEIGHTED):
        return torch.empty(shape).normal_(0.0, std, generator=generator)
    if name in ("weight", "running_var"):
        return torch.ones(shape)
    return torch.zeros(shape)


def init_other_heads(
    model: nn.Module, *, generator: torch.Generator, gather: Gather | None = None
) -> None:
    """Re-draw, from ``generator``, every top-level child not in :data:`OWN_INIT` (UperNet's fpn,
    decode and auxiliary heads) as transformers initialises it. A bare encoder has none."""
    if not hasattr(model, getattr(model, "base_model_prefix", "beit")):
        return  # BeitModel / ViTModel: every child is the encoder's own
    std = getattr(model.config, "initializer_range", STD) or STD
    with torch.no_grad():
        for child_name, child in model.named_children():
            if child_name in OWN_INIT:
                continue
            for m in child.modules():
                params = list(m.named_parameters(recurse=False))
                with _whole([p for _, p in params], gather):
                    for n, p in params:
                        p.copy_(transformers_value(m, n, p.shape, generator, std))
                for n, b in m.named_buffers(recurse=False):
                    if n in ("running_mean", "running_var"):
                        b.copy_(transformers_value(m, n, b.shape, generator, std))


def _init_modules(root: nn.Module, normal: Callable[[torch.Tensor], None]) -> None:
    for m in root.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            normal(m.weight)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
