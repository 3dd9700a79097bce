"""Resize position information when a model changes resolution.

Relative position bias tables follow BEiT fine-tuning (microsoft/unilm ``beit/
run_class_finetuning.py``): the source offsets are placed on a geometric progression whose
outermost offset lands on the destination's, then each head's table is re-sampled with a cubic
spline onto the destination's integer offsets. unilm used ``scipy.interpolate.interp2d(kind=
"cubic")``, removed from SciPy 1.14; on a rectangular grid interp2d fitted the same FITPACK
interpolating bicubic spline (s=0) as :class:`scipy.interpolate.RectBivariateSpline` with
``kx=ky=3``, which is what we use. The three extra entries (cls→token, token→cls, cls→cls)
are kept as they are. Absolute position embeddings are resized bicubically, as transformers'
``interpolate_pos_encoding`` does.

transformers 5 computes BEiT's relative position index from the window size at every forward,
so a model works at a new size once its tables are resized and ``config.image_size`` is set.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_EXTRA = 3  # cls→token, token→cls, cls→cls


def _geometric_ratio(n: int, target: float) -> float:
    """q with 1 + q + ... + q**(n-1) == target (bisection; the sum grows with q)."""
    lo, hi = 1e-3, 4.0
    while hi - lo > 1e-10:
        q = (lo + hi) / 2.0
        if sum(q**k for k in range(n)) > target:
            hi = q
        else:
            lo = q
    return (lo + hi) / 2.0


def _spline_resample(table: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Bicubic interpolating spline of ``table`` [S, S] on offsets ``src``, evaluated on ``dst``."""
    from scipy.interpolate import RectBivariateSpline

    spline = RectBivariateSpline(src, src, table, kx=3, ky=3, s=0)
    dst = np.clip(dst, src[0], src[-1])  # the progression's end may miss by the bisection tolerance
    return spline(dst, dst)


def resize_rel_pos_table(table: torch.Tensor, dst_window: int) -> torch.Tensor:
    """A BEiT relative position bias table [(2W-1)^2 + 3, heads] for a ``dst_window`` patch grid.

    Only square windows are supported (as in BEiT). A table already of that size is returned
    unchanged.
    """
    num_pos, heads = table.shape
    src_size = math.isqrt(num_pos - NUM_EXTRA)
    if src_size * src_size + NUM_EXTRA != num_pos:
        raise ValueError(f"not a square relative position table: {num_pos} rows")
    dst_size = 2 * dst_window - 1
    if dst_size == src_size:
        return table
    grid, extra = table[:-NUM_EXTRA], table[-NUM_EXTRA:]
    half = src_size // 2
    q = _geometric_ratio(half, dst_size // 2)
    dis = np.cumsum([q**k for k in range(half)])  # 1, 1+q, 1+q+q^2, ... (unilm's `dis`)
    src = np.concatenate([-dis[::-1], [0.0], dis])
    t = dst_size // 2
    dst = np.arange(-t, t + 0.1, 1.0)
    values = grid.detach().float().cpu().numpy().reshape(src_size, src_size, heads)
    out = np.stack([_spline_resample(values[..., h], src, dst) for h in range(heads)], -1)
    new_grid = torch.from_numpy(out.reshape(dst_size * dst_size, heads)).to(table)
    return torch.cat([new_grid, extra], 0)


def resize_abs_pos_embed(pos: torch.Tensor, dst_grid: int, num_prefix: int = 1) -> torch.Tensor:
    """Absolute position embeddings [1, P + G*G, D] resized bicubically to a ``dst_grid`` grid."""
    prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
    src_grid = math.isqrt(grid.shape[1])
    if src_grid * src_grid != grid.shape[1]:
        raise ValueError(f"not a square position grid: {grid.shape[1]} positions")
    if src_grid == dst_grid:
        return pos
    dim = grid.shape[-1]
    grid = grid.reshape(1, src_grid, src_grid, dim).permute(0, 3, 1, 2).float()  # [1, D, G, G]
    grid = F.interpolate(grid, size=(dst_grid, dst_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, dst_grid * dst_grid, dim).to(pos.dtype)
    return torch.cat([prefix, grid], 1)


def _side(image_size: int | list[int] | tuple[int, ...]) -> int:
    if isinstance(image_size, (list, tuple)):
        if image_size[0] != image_size[1]:
            raise NotImplementedError("only square images can change resolution")
        return int(image_size[0])
    return int(image_size)


def resize_state_dict(
    state_dict: dict[str, torch.Tensor], patch_size: int, image_size: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Resize every rel-pos table and absolute position embedding for ``image_size``.

    Returns the new state dict and the keys that changed.
    """
    window = image_size // patch_size
    out, changed = dict(state_dict), []
    for key, value in state_dict.items():
        if key.endswith("relative_position_bias_table"):
            new = resize_rel_pos_table(value, window)
        elif key.endswith("embeddings.position_embeddings"):
            new = resize_abs_pos_embed(value, window)
        else:
            continue
        if new is not value:
            out[key] = new
            changed.append(key)
    return out, changed


def resize_model(model: nn.Module, image_size: int) -> nn.Module:
    """A copy of a transformers BEiT/ViT model that runs at ``image_size`` (not under ZeRO-3)."""
    config = copy.deepcopy(model.config)
    state, _ = resize_state_dict(model.state_dict(), config.patch_size, image_size)
    config.image_size = image_size
    new = type(model)._from_config(config, attn_implementation=model.config._attn_implementation)
    new.load_state_dict(state)
    return new.train(model.training)


def current_image_size(config: object) -> int:
    return _side(config.image_size)  # type: ignore[attr-defined]
