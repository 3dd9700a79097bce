"""Pillow's bicubic and Lanczos resizes of uint8 RGB, at SIMD speed. A pure module (no Ray).

Pillow's resampler is scalar C; on one core the two resizes of a BEiT sample cost more than
decoding the JPEG. Here:

- **bicubic** (the patch view) is torch's uint8 antialiased kernel (``F.interpolate(...,
  mode="bicubic", antialias=True)``, vectorized), which uses Pillow's filter (a = -0.5, support
  widened by the downscale factor, taps renormalized at the edges): mean |Δ| ~0.01 uint8 levels
  from ``Image.resize`` on the same crop, ~3x faster.
- **Lanczos** (the tokenizer view) is Pillow's own coefficients (``precompute_coeffs`` in
  ``Resample.c``: Lanczos-3, support widened on downscale, clipped and renormalized at the
  edges) as two banded matrices, applied horizontally then vertically with the intermediate
  rounded to uint8 as Pillow does: off by at most 1 level on ~0.02% of pixels, ~1.5x faster.
- Downscales of :data:`REDUCING_GAP` x or more (huge PNGs, or JPEGs with draft off) stay on
  Pillow with ``reducing_gap``: a box pre-reduce there beats any exact filter.

Crop boxes are whole pixels here (a draft-decoded JPEG's box is rounded to the nearest pixel
of the reduced image).

    patch = resize_box(rgb, (left, top, right, bottom), 224)    # torch uint8 [3, 224, 224]
    tok = resize_lanczos(patch, 112)                           # torch uint8 [3, 112, 112]
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REDUCING_GAP = 3.0  # Pillow's integer pre-reduce for big downscales


def pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, ...]:
    """``box`` (left, top, right, bottom) rounded to whole pixels inside a ``width`` x ``height``
    image, at least one pixel wide and high."""
    left = min(max(int(round(box[0])), 0), width - 1)
    top = min(max(int(round(box[1])), 0), height - 1)
    right = min(max(int(round(box[2])), left + 1), width)
    bottom = min(max(int(round(box[3])), top + 1), height)
    return left, top, right, bottom


def resize_box(
    img: Image.Image | np.ndarray,
    box: tuple[float, float, float, float],
    size: int,
    resample: str = "bicubic",
) -> torch.Tensor:
    """The ``box`` of RGB ``img`` (a Pillow image or uint8 [H, W, 3]) → ``size`` x ``size``
    (``bicubic`` or ``lanczos``): uint8 [3, S, S]."""
    width, height = (img.shape[1], img.shape[0]) if isinstance(img, np.ndarray) else img.size
    left, top, right, bottom = pixel_box(box, width, height)
    if max(right - left, bottom - top) >= REDUCING_GAP * size:
        pil = Image.fromarray(img) if isinstance(img, np.ndarray) else img
        f = Image.Resampling.BICUBIC if resample == "bicubic" else Image.Resampling.LANCZOS
        out = pil.resize((size, size), f, box=box, reducing_gap=REDUCING_GAP)
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)
    if isinstance(img, np.ndarray):
        crop = np.ascontiguousarray(img[top:bottom, left:right])  # no copy for a whole array
    else:
        crop = np.array(img.crop((left, top, right, bottom)))  # [h, w, 3], writable
    x = torch.from_numpy(crop).permute(2, 0, 1)  # [3, h, w], channels-last memory
    if resample == "lanczos":
        return resize_lanczos(x, size)
    out = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True)
    return out[0]  # [3, S, S]


def _lanczos3(x: np.ndarray) -> np.ndarray:
    # Pillow: sinc(x) * sinc(x / 3) on (-3, 3), 0 outside; np.sinc is sin(pi x) / (pi x).
    return np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)


@functools.lru_cache(maxsize=128)
def lanczos_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """Pillow's Lanczos coefficients for ``in_size`` → ``out_size``: float32 [in, out]."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    center = (np.arange(out_size) + 0.5) * scale  # [out]
    lo = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int), as Pillow
    hi = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    idx = lo[:, None] + np.arange(int(math.ceil(2 * support)) + 2)  # [out, K]
    valid = idx < hi[:, None]
    w = _lanczos3((idx - center[:, None] + 0.5) / filterscale) * valid
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=w.copy(), where=total != 0)
    m = np.zeros((in_size, out_size), np.float64)
    rows, cols = np.nonzero(valid)
    m[idx[rows, cols], rows] = w[rows, cols]
    return torch.from_numpy(m.astype(np.float32))


@functools.lru_cache(maxsize=256)
def lanczos_blocks(
    in_size: int, out_size: int, group: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lanczos_matrix` cut into its non-zero band: outputs in groups of ``group``, each
    reading K consecutive inputs. Returns (rows int64 [G·K], weights float32 [G, group, K]) with
    G = ceil(out / group); output o = group·g + i is Σ_k weights[g, i, k] · input[rows[g·K + k]]."""
    m = lanczos_matrix(in_size, out_size)  # [in, out]
    n = -(-out_size // group)
    spans = []
    for g in range(n):
        nz = torch.nonzero(m[:, g * group : (g + 1) * group].any(dim=1)).flatten()
        spans.append((int(nz.min()), int(nz.max()) + 1))
    k = min(max(hi - lo for lo, hi in spans), in_size)
    starts = [min(lo, in_size - k) for lo, _ in spans]  # every window inside the input
    rows = torch.tensor([s + i for s in starts for i in range(k)], dtype=torch.int64)
    weights = torch.zeros(n, group, k)
    for g, s in enumerate(starts):
        cols = m[s : s + k, g * group : (g + 1) * group]  # [K, ≤ group]
        weights[g, : cols.shape[1]] = cols.T
    return rows, weights


def _lanczos_rows(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """Pillow's Lanczos along dim 0 of uint8 [in, R] → float [out, R] holding whole uint8
    levels (rounded, clipped): only the filter's band is multiplied (12 taps at 2x, not ``in``)."""
    rows, weights = lanczos_blocks(x.shape[0], out_size)
    n, group, k = weights.shape
    windows = x.index_select(0, rows).float().view(n, k, -1)  # [G, K, R]
    y = torch.bmm(weights, windows).view(n * group, -1)[:out_size]  # [out, R]
    return y.round_().clamp_(0, 255)


def resize_lanczos(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] → Lanczos [3, S, S] uint8, as ``Image.resize(..., LANCZOS)``."""
    _, h, w = x.shape
    y = x.permute(2, 1, 0).contiguous()  # [W, H, 3] uint8
    if w != size:  # Pillow: horizontal pass first, rounded to uint8 in between
        y = _lanczos_rows(y.view(w, h * 3), size).view(size, h, 3)  # [S, H, 3]
    y = y.transpose(0, 1).to(torch.uint8, memory_format=torch.contiguous_format)  # [H, S, 3]
    if h != size:
        y = _lanczos_rows(y.view(h, -1), size).view(size, -1, 3).to(torch.uint8)  # [S, S, 3]
    return y.permute(2, 0, 1)  # [3, S, S]
