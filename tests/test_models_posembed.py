"""Relative position bias (BEiT geometric method) and absolute position embedding resizing."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from beit_ray.models.build import build_model
from beit_ray.models.posembed import (
    _spline_resample,
    resize_abs_pos_embed,
    resize_model,
    resize_rel_pos_table,
)


def _smooth_table(window: int, heads: int = 4) -> torch.Tensor:
    """A bias that decays smoothly with distance (like trained BEiT tables) + 3 extra entries."""
    side = 2 * window - 1
    d = torch.arange(side, dtype=torch.float32) - (window - 1)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    grid = torch.stack([-(dx**2 + dy**2).sqrt() * (h + 1) / 4 for h in range(heads)], -1)
    return torch.cat(
        [
            grid.reshape(side * side, heads),
            torch.tensor([[1.0] * heads, [2.0] * heads, [3.0] * heads]),
        ]
    )


def test_same_size_is_unchanged_and_spline_interpolates():
    table = torch.randn(7 * 7 + 3, 4, generator=torch.Generator().manual_seed(0))
    assert resize_rel_pos_table(table, 4) is table
    # the cubic spline passes through its nodes: resampling onto the source offsets is exact
    values = table[:-3, 0].numpy().reshape(7, 7).astype(np.float64)
    src = np.array([-4.2, -2.5, -1.0, 0.0, 1.0, 2.5, 4.2])
    assert np.abs(_spline_resample(values, src, src) - values).max() <= 1e-6


def test_resize_keeps_extra_entries_and_geometry():
    table = _smooth_table(4)  # 7x7 offsets
    big = resize_rel_pos_table(table, 7)  # 13x13 offsets
    assert big.shape == (13 * 13 + 3, 4)
    assert torch.equal(big[-3:], table[-3:])  # cls→token, token→cls, cls→cls kept
    grid = big[:-3].reshape(13, 13, 4)
    src = table[:-3].reshape(7, 7, 4)
    assert torch.allclose(grid[6, 6], src[3, 3], atol=1e-5)  # zero offset stays at the centre
    assert torch.allclose(grid[0, 0], src[0, 0], atol=1e-3)  # outermost offsets map onto each other
    assert torch.allclose(grid, grid.flip(0).flip(1), atol=1e-4)  # symmetry survives
    small = resize_rel_pos_table(table, 3)  # shrinking works too (q < 1)
    assert small.shape == (5 * 5 + 3, 4) and torch.isfinite(small).all()


def test_abs_pos_embed_bicubic():
    pos = torch.randn(1, 1 + 16, 8, generator=torch.Generator().manual_seed(0))
    assert resize_abs_pos_embed(pos, 4) is pos
    out = resize_abs_pos_embed(pos, 6)
    assert out.shape == (1, 37, 8) and torch.equal(out[:, :1], pos[:, :1])
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 36, 8))


def _smooth_image(size: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = torch.stack([torch.sin(3 * x + 1), torch.cos(2 * y), torch.sin(2 * x * y + 0.5)])
    return img[None]  # [1, 3, S, S]


def test_resized_model_matches_on_smooth_input():
    with torch.random.fork_rng():  # transformers initialises from the global RNG: keep it local
        torch.manual_seed(0)
        model = build_model("debug", "features", layer_scale=1.0).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.relative_position_bias.relative_position_bias_table.copy_(_smooth_table(4))
    big = resize_model(model, 48)
    assert big.config.image_size == 48 and model.config.image_size == 32
    assert big.layers[0].relative_position_bias.relative_position_bias_table.shape == (
        11 * 11 + 3,
        4,
    )
    img = _smooth_image(32)
    up = F.interpolate(img, size=(48, 48), mode="bicubic", align_corners=False)
    with torch.no_grad():
        a = model(img).pooler_output
        b = big(up).pooler_output
        for layer in big.layers:  # the same model without its (resized) position bias
            layer.relative_position_bias.relative_position_bias_table.zero_()
        without = big(up).pooler_output
    cos = F.cosine_similarity(a, b).item()
    assert cos > 0.99, cos
    assert cos > F.cosine_similarity(a, without).item()  # the resized bias carries the geometry
