"""The vectorized resizes and colour jitter against Pillow's and the reference arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from beit_ray.data.augment import color_jitter
from beit_ray.data.resize import (
    REDUCING_GAP,
    lanczos_blocks,
    lanczos_matrix,
    resize_box,
    resize_lanczos,
)

BICUBIC, LANCZOS = Image.Resampling.BICUBIC, Image.Resampling.LANCZOS


@pytest.fixture(scope="module")
def photo(photos) -> Image.Image:
    return Image.fromarray(photos["astronaut"]).resize((500, 375), BICUBIC)


def _diff(ours: torch.Tensor, pil: Image.Image) -> np.ndarray:
    ref = np.asarray(pil).transpose(2, 0, 1).astype(np.int16)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == ref.shape
    return np.abs(ours.numpy().astype(np.int16) - ref)


@pytest.mark.parametrize("resample", ["bicubic", "lanczos"])
@pytest.mark.parametrize(
    "box,size",
    [
        ((40, 30, 340, 310), 224),  # 1.3x downscale
        ((0, 0, 500, 375), 224),  # whole image, non-square
        ((100, 50, 250, 190), 224),  # upscale
        ((10, 10, 90, 70), 112),  # small crop, upscale
        ((5, 3, 337, 300), 112),  # 2.97x: still the vectorized path
    ],
)
def test_resize_box_matches_pillow_on_the_crop(photo, resample, box, size):
    pil = photo.crop(box).resize((size, size), BICUBIC if resample == "bicubic" else LANCZOS)
    d = _diff(resize_box(photo, box, size, resample), pil)
    assert d.max() <= 1 and d.mean() < 0.02, (d.max(), d.mean())


def test_big_downscales_use_pillows_reducing_gap(photo):
    big = photo.resize((1500, 1125), BICUBIC)
    box = (0, 0, 3 * 224 * 2, 1125)  # ≥ REDUCING_GAP x the output on one side
    assert (box[2] - box[0]) >= REDUCING_GAP * 224
    out = resize_box(big, box, 224)
    same = big.resize((224, 224), BICUBIC, box=box, reducing_gap=REDUCING_GAP)
    assert (_diff(out, same) == 0).all()
    exact = big.crop(box).resize((224, 224), BICUBIC)
    assert _diff(out, exact).mean() < 0.5  # the box pre-reduce: a fraction of a level


def test_fractional_boxes_round_to_whole_pixels(photo):
    out = resize_box(photo, (40.4, 29.6, 339.7, 310.2), 224)
    assert (out == resize_box(photo, (40, 30, 340, 310), 224)).all()


def test_lanczos_from_the_patch_view_is_pillows(photo):
    patch = photo.resize((224, 224), BICUBIC, box=(40, 30, 340, 310))
    x = torch.from_numpy(np.array(patch)).permute(2, 0, 1)
    d = _diff(resize_lanczos(x, 112), patch.resize((112, 112), LANCZOS))
    assert d.max() <= 1 and d.mean() < 0.001  # ±1 only where Pillow's fixed point rounds
    m = lanczos_matrix(224, 112)
    assert torch.allclose(m.sum(0), torch.ones(112), atol=1e-5)  # renormalized columns
    assert (m != 0).sum(0).max() == 12  # Lanczos-3 at 2x: 12 taps


@pytest.mark.parametrize(
    "in_size,out_size", [(224, 112), (297, 112), (60, 112), (7, 3), (112, 112)]
)
def test_lanczos_blocks_hold_every_weight_of_the_matrix(in_size, out_size):
    m = lanczos_matrix(in_size, out_size)  # [in, out]
    rows, weights = lanczos_blocks(in_size, out_size)
    n, group, k = weights.shape
    rebuilt = torch.zeros(in_size, n * group)
    for g in range(n):
        for i in range(group):
            rebuilt[rows[g * k : (g + 1) * k], g * group + i] += weights[g, i]
    assert torch.equal(rebuilt[:, :out_size], m) and not rebuilt[:, out_size:].any()
    assert k <= in_size and (k < in_size or in_size <= 2 * group)  # a band, not the matrix


def _reference_jitter(views, strength, rng):  # the float arithmetic, one op at a time
    factors = rng.uniform(1 - strength, 1 + strength, size=3)
    order = rng.permutation(3)
    out = []
    for v in views:
        x = v.astype(np.float64)
        for op in order.tolist():
            f = float(factors[op])
            gray = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
            if op == 0:
                x = x * f
            elif op == 1:
                x = x * f + gray.mean() * (1 - f)
            else:
                x = x * f + gray[None] * (1 - f)
            x = np.clip(x, 0, 255)
        out.append(np.rint(x).astype(np.uint8))
    return out


def test_color_jitter_is_brightness_contrast_saturation_in_random_order(photo):
    a = np.asarray(photo.resize((224, 224))).transpose(2, 0, 1).copy()
    b = np.asarray(photo.resize((112, 112))).transpose(2, 0, 1).copy()
    changed = 0
    for seed in range(6):
        ref = _reference_jitter([a, b], 0.4, np.random.default_rng(seed))
        got = color_jitter(
            [torch.from_numpy(a), torch.from_numpy(b)], 0.4, np.random.default_rng(seed)
        )
        for r, g in zip(ref, got, strict=True):
            assert g.dtype == torch.uint8
            assert np.abs(r.astype(np.int16) - g.numpy().astype(np.int16)).max() <= 1
        changed += int((got[0].numpy() != a).mean() > 0.5)
    assert changed == 6  # every draw visibly changes the image
