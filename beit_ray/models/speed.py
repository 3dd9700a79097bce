"""A faster BEiT encoder forward on the same modules and parameters as transformers' BeitModel.

transformers' BEiT block spends a third of a CPU training step outside the GEMMs (profile of
BEiT-base, batch 8, in bench/RESULTS.md): three separate q/k/v projections, SDPA falling back to
its math path because the relative-position bias needs a gradient (which scales q and k
separately, copies them and runs a masked "safe" softmax), the bias table re-interpolated to its
own size every forward, and layer scale, drop path and the residual add as four elementwise
passes each way. :func:`beit_encoder` computes the same function with one fused q/k/v GEMM, the
scale and the bias folded into one ``baddbmm``, a plain softmax and one ``addcmul`` per residual
branch. Parameters stay where transformers keeps them (checkpoints, layer decay and optimizers
see the usual names); drop path draws from the same global generator in the same order as
``BeitDropPath``, so a seeded run matches transformers' draws.

:func:`fast_path_ok` says when it applies; otherwise callers use the transformers module.

On CUDA the attention is SDPA with the bias as an additive mask (its memory-efficient kernel
takes a bias with a gradient and never materialises the [B*H, T, T] probabilities in the
backward); the bmm + softmax form above was tuned for CPU. :func:`speed_options` adds activation
checkpointing and ``torch.compile`` of the block, applied from outside by the training layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from transformers.models.beit.modeling_beit import (
    BeitLayer,
    BeitModel,
    BeitRelativePositionBias,
)


def fast_path_ok(beit: BeitModel, pixel_values: torch.Tensor) -> bool:
    """True when :func:`beit_encoder` computes exactly what ``beit(pixel_values, ...)`` does.

    Not for: ZeRO-3 partitioned parameters (they are gathered by hooks on each submodule's own
    forward, which the fused path skips), non-zero dropout, or images of another size than the
    config's (position interpolation). Gradient checkpointing is honoured (per block).
    """
    cfg = beit.config
    size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size,) * 2
    return (
        tuple(pixel_values.shape[-2:]) == tuple(size)
        and cfg.hidden_dropout_prob == 0.0
        and cfg.attention_probs_dropout_prob == 0.0
        and not any(hasattr(p, "ds_id") for p in beit.parameters())
    )


def relative_position_bias(module: BeitRelativePositionBias) -> torch.Tensor:
    """The [1, H, T, T] attention bias at the module's own window (T = 1 + patches).

    transformers bilinearly resizes the table to the window first; at the table's own size that
    is the identity, so the gather alone gives the same values and the same table gradient.
    """
    index = module.generate_relative_position_index(module.window_size)  # [T, T], lru-cached
    bias = module.relative_position_bias_table[index.view(-1)]  # [T*T, H]
    t = index.shape[0]
    return bias.view(t, t, -1).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]


def _residual(
    layer: BeitLayer, residual: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """residual + drop_path(scale * branch) in one pass; residual, branch [B, R, D], scale [D]."""
    drop = layer.drop_path
    if layer.training and getattr(drop, "drop_prob", 0.0) > 0.0:
        keep = 1.0 - drop.drop_prob
        # Same draw as BeitDropPath (global generator, shape [B, 1, 1], same order) so seeded
        # runs agree with transformers; the per-sample factor folds into the layer scale.
        noise = torch.rand((branch.shape[0], 1, 1), dtype=branch.dtype, device=branch.device)
        scale = scale * (torch.floor(noise + keep) / keep)  # [B, 1, D] or [B, 1, 1]
    if isinstance(scale, float) and scale == 1.0:
        return residual + branch
    return torch.addcmul(residual, branch, scale)


def use_sdpa(x: torch.Tensor, bias: torch.Tensor | None, sdpa: bool | None = None) -> bool:
    """SDPA for this attention? Unless told: on CUDA (its memory-efficient kernel takes a bias
    with a gradient); on CPU when the bias needs no gradient (eval, inference), which its flash
    kernel takes. A CPU bias with a gradient leaves SDPA only its math kernel, slower than
    bmm + softmax here (bench/RESULTS.md)."""
    if sdpa is not None:
        return sdpa
    return x.is_cuda or bias is None or not (bias.requires_grad and torch.is_grad_enabled())


def _attention(
    layer: BeitLayer, x: torch.Tensor, bias: torch.Tensor | None, sdpa: bool | None = None
) -> torch.Tensor:
    """Self-attention of layer-normed tokens x [B, T, D] with additive bias [1, H, T, T].

    Returns the heads' outputs [B, T, D] before the output projection. SDPA gets 4-D q/k/v and
    the bias as its mask: its fused kernels (flash, memory-efficient) take only that layout.
    """
    attn = layer.attention
    b, t, d = x.shape
    heads, hd = attn.num_attention_heads, attn.head_dim
    q_bias = attn.q_proj.bias
    k_bias = attn.k_proj.bias if attn.k_proj.bias is not None else torch.zeros_like(q_bias)
    weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # [3D, D]
    qkv = F.linear(x, weight, torch.cat([q_bias, k_bias, attn.v_proj.bias]))  # [B, T, 3D]
    qkv = qkv.view(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd], a view
    if use_sdpa(x, bias, sdpa):
        q, k, v = qkv.unbind(0)  # [B, H, T, hd] each, last dim contiguous
        mask = None if bias is None else bias.to(q.dtype)  # [1, H, T, T] broadcasts over B
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        return out.transpose(1, 2).reshape(b, t, heads * hd)  # [B, T, D]
    # One copy into head-major layout for all three: [3, B*H, T, hd].
    q, k, v = qkv.reshape(3, b * heads, t, hd).unbind(0)
    if bias is None:
        scores = torch.bmm(q, k.transpose(1, 2)) * attn.scaling
    else:
        full = bias.expand(b, heads, t, t).reshape(b * heads, t, t)
        scores = torch.baddbmm(full, q, k.transpose(1, 2), alpha=attn.scaling)  # [B*H, T, T]
    out = torch.bmm(scores.softmax(-1), v)  # [B*H, T, hd]
    return out.view(b, heads, t, hd).transpose(1, 2).reshape(b, t, heads * hd)  # [B, T, D]


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` [B, R] of each image of x [B, T, D]: [B, R, D] (a fixed-size gather)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def beit_layer(
    layer: BeitLayer,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor | None = None,
    sdpa: bool | None = None,
) -> torch.Tensor:
    """One BEiT block on x [B, T, D]; ``bias`` is the shared bias [1, H, T, T] or None.

    With ``rows`` (int64 [B, R], token positions) only those tokens' outputs are computed and
    returned, [B, R, D]: every token still serves as key and value, but the output projection
    and the MLP, three quarters of the block, skip the other rows. R is fixed, so the shapes
    (and a compiled graph) do not depend on the mask and nothing waits on the device.
    """
    if layer.relative_position_bias is not None:
        own = relative_position_bias(layer.relative_position_bias)  # [1, H, T, T]
        bias = own if bias is None else own + bias
    heads_out = _attention(layer, layer.layernorm_before(x), bias, sdpa)  # [B, T, D]
    if rows is not None:
        x, heads_out = _take(x, rows), _take(heads_out, rows)  # [B, R, D]
    mlp = layer.mlp
    x = _residual(layer, x, layer.attention.o_proj(heads_out), layer.lambda_1)
    h = mlp.fc2(mlp.activation_fn(mlp.fc1(layer.layernorm_after(x))))
    return _residual(layer, x, h, layer.lambda_2)


def beit_encoder(
    beit: BeitModel,
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    sdpa: bool | None = None,
) -> torch.Tensor:
    """``beit(pixel_values, bool_masked_pos=...).last_hidden_state`` [B, 1+N, D], faster.

    With ``rows`` (int64 [B, R], token positions in 0..N) the last block computes only those
    tokens and the result is their rows [B, R, D]. ``sdpa``: attention kernel (None: see
    :func:`use_sdpa`). Call only when :func:`fast_path_ok` holds.
    """
    x = beit.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)  # [B, 1+N, D]
    bias = None
    if beit.shared_position_bias is not None:  # one [1, H, T, T] table for all blocks
        bias = relative_position_bias(beit.shared_position_bias)
    last = len(beit.layers) - 1
    block = _compiled_layer() if getattr(beit, "beit_ray_compile", False) else beit_layer
    for i, layer in enumerate(beit.layers):
        keep = rows if i == last else None
        if layer.training and getattr(layer, "gradient_checkpointing", False):
            # Recomputed in backward; the RNG state is replayed, so drop path draws the same.
            x = torch.utils.checkpoint.checkpoint(
                block, layer, x, bias, keep, sdpa, use_reentrant=False
            )
        else:
            x = block(layer, x, bias, keep, sdpa)
    return beit.layernorm(x)


_COMPILED: list[Any] = []


def _compiled_layer() -> Any:
    """``beit_layer`` under torch.compile, built once per process (recompiles per shape)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(beit_layer, dynamic=False))
    return _COMPILED[0]


def speed_options(model: torch.nn.Module, checkpointing: bool, compile: bool) -> None:
    """Activation checkpointing and torch.compile of the BEiT blocks of ``model``, in place.

    Checkpointing goes through transformers' switch, so both the fast path and transformers'
    own forward (ZeRO-3, other sizes) recompute per block; compile applies to the fast path.
    """
    if checkpointing:
        model.activation_checkpointing_enable()  # per block, non-reentrant
    if compile:
        for m in model.modules():
            if isinstance(m, BeitModel):
                m.beit_ray_compile = True
