"""BEiT's blockwise masking (microsoft/unilm ``beit/masking_generator.py``), with an explicit RNG.

Blocks of at least ``min_num_patches`` patches with a log-uniform aspect ratio are placed at
random until ``num_masking_patches`` are masked; each block gets up to 10 attempts and a block
that would overshoot the budget is rejected, so the count never exceeds it.

    gen = BlockMaskGenerator(input_size=14, num_masking_patches=75)
    mask = gen(np.random.default_rng(0))   # bool [14, 14]
"""

from __future__ import annotations

import math

import numpy as np


class BlockMaskGenerator:
    """Callable ``(rng) -> bool [H, W]`` mask, as BEiT's MaskingGenerator."""

    def __init__(
        self,
        input_size: int | tuple[int, int] = 14,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = (
            (input_size, input_size) if isinstance(input_size, int) else input_size
        )
        self.num_patches = self.height * self.width
        if not 0 < num_masking_patches <= self.num_patches:
            raise ValueError(f"num_masking_patches must be in [1, {self.num_patches}]")
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator({self.height}x{self.width}, masked={self.num_masking_patches}, "
            f"min={self.min_num_patches}, max={self.max_num_patches})"
        )

    def _block(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        """Try up to 10 times to add one block; returns how many new patches it masked."""
        delta = 0
        # All 10 attempts' randomness in one call into numpy (area, aspect, top, left): a
        # Generator call costs microseconds, so per-attempt draws made masking dominate.
        u = rng.random((10, 4)).tolist()
        lo = self.min_num_patches
        log_lo, log_hi = self.log_aspect_ratio
        for ua, ur, ut, ul in u:
            # a + (b - a) * u, like random.uniform, which also accepts b < a (small budgets).
            target_area = lo + (max_mask_patches - lo) * ua
            aspect_ratio = math.exp(log_lo + (log_hi - log_lo) * ur)
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(ut * (self.height - h + 1))  # uniform in [0, height - h]
                left = int(ul * (self.width - w + 1))
                region = mask[top : top + h, left : left + w]
                new = h * w - int(region.sum())
                # Overlap: the block must add something and stay within the budget.
                if 0 < new <= max_mask_patches:
                    region[...] = True
                    delta += new
                if delta > 0:
                    break
        return delta

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._block(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask


def random_mask(rng: np.random.Generator, input_size: int, num_masking_patches: int) -> np.ndarray:
    """Uniformly random (non-block) mask with exactly ``num_masking_patches``; a baseline."""
    flat = np.zeros(input_size * input_size, dtype=bool)
    flat[rng.choice(flat.size, num_masking_patches, replace=False)] = True
    return flat.reshape(input_size, input_size)
