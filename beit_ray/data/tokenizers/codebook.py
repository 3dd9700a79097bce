"""A visual tokenizer with no external weights: k-means codes of the user's own image patches.

The tokenizer view [3, T, T] is cut into the g × g grid of cells (T / g pixels square, 8 for
112/14). Each cell becomes a feature: its pixels with the cell mean removed and scaled to unit
norm (the local pattern: edges, texture), concatenated with the cell's mean colour (weighted
by ``COLOR_WEIGHT``). The token is the nearest of ``vocab_size`` k-means centroids, fitted by
``jobs/fit_tokenizer.py`` on a sample of the source and stored as safetensors.

Trade-off against DALL-E's dVAE: nothing to download or convert and no licence question; the
codes fit the user's domain (medical, satellite, documents) and the vocabulary size is a free
choice; fitting takes minutes on CPUs. But the targets are lower-level: a code describes one
8 × 8 cell's colour and pattern with no context, so predicting it is closer to pixel
regression (as MAE) than DALL-E's codes, which a deep encoder computed from a 7 × 7+ receptive
field and which carry more semantic grouping. Expect DALL-E targets to transfer better on
natural images when the weights are available; the codebook is the self-contained option.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

COLOR_WEIGHT = 0.5


def patch_features(pixels: np.ndarray | torch.Tensor, grid: int) -> torch.Tensor:
    """uint8 [B, 3, T, T] → float32 [B, g*g, 3*c*c + 3] cell features (c = T / g)."""
    x = pixels if isinstance(pixels, torch.Tensor) else torch.as_tensor(np.asarray(pixels))
    x = x.float() / 255.0  # [B, 3, T, T]
    b, ch, t, _ = x.shape
    c = t // grid
    cells = (
        x.reshape(b, ch, grid, c, grid, c)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(b, grid * grid, ch, c * c)
    )
    mean = cells.mean(-1, keepdim=True)  # [B, N, 3, 1]
    pattern = (cells - mean).reshape(b, grid * grid, -1)  # [B, N, 3*c*c]
    pattern = pattern / (pattern.norm(dim=-1, keepdim=True) + 1e-3)
    colour = (mean.squeeze(-1) - 0.5) * COLOR_WEIGHT  # [B, N, 3]
    return torch.cat([pattern, colour], dim=-1)


class Codebook:
    """Nearest-centroid tokenizer: ``tokenize(uint8 [B, 3, T, T]) -> int64 [B, g*g]``."""

    def __init__(self, centroids: torch.Tensor, grid: int) -> None:
        self.centroids = centroids.float()  # [K, D]
        self.grid = grid
        self.half_sq = 0.5 * (self.centroids**2).sum(-1)  # [K]

    def to(self, device: torch.device | str) -> Codebook:
        """This codebook with its centroids on ``device``."""
        return Codebook(self.centroids.to(device), self.grid)

    @property
    def vocab_size(self) -> int:
        return self.centroids.shape[0]

    @torch.no_grad()
    def assign(self, feats: torch.Tensor) -> torch.Tensor:
        """[..., D] → nearest centroid ids [...]: argmax of f·c - |c|²/2."""
        return (feats @ self.centroids.T - self.half_sq).argmax(-1)

    def tokenize(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.assign(patch_features(pixels, self.grid))

    def save(self, uri: str, storage_cfg: Any = None) -> None:
        from safetensors.torch import save

        from beit_ray import storage

        data = save(
            {"centroids": self.centroids.contiguous()},
            metadata={"grid": str(self.grid), "kind": "codebook"},
        )
        storage.write_bytes(uri, data, storage_cfg)

    @classmethod
    def load(cls, uri: str, storage_cfg: Any = None) -> Codebook:
        import json
        import struct

        from safetensors.torch import load

        from beit_ray import storage

        raw = storage.read_bytes(uri, storage_cfg)
        header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
        grid = int(header.get("__metadata__", {}).get("grid", 0))
        if not grid:
            raise ValueError(f"{uri}: not a codebook tokenizer (no grid in metadata)")
        return cls(load(raw)["centroids"], grid)


def kmeans(
    feats: torch.Tensor, k: int, iterations: int, generator: torch.Generator, chunk: int = 65536
) -> torch.Tensor:
    """Lloyd's k-means on [M, D] features → centroids [k, D]; empty clusters are re-seeded."""
    m = feats.shape[0]
    if m < k:
        raise ValueError(f"need at least vocab_size={k} patch samples, got {m}")
    cent = feats[torch.randperm(m, generator=generator)[:k]].clone()  # [k, D]
    for _ in range(iterations):
        half_sq = 0.5 * (cent**2).sum(-1)
        ids = torch.cat(
            [(feats[i : i + chunk] @ cent.T - half_sq).argmax(-1) for i in range(0, m, chunk)]
        )
        sums = torch.zeros_like(cent).index_add_(0, ids, feats)
        counts = torch.bincount(ids, minlength=k).float()
        empty = counts == 0
        cent = sums / counts.clamp(min=1)[:, None]
        if empty.any():
            cent[empty] = feats[torch.randint(0, m, (int(empty.sum()),), generator=generator)]
    return cent
