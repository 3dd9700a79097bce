"""Visual tokenizers (DALL-E dVAE encoder, fitted codebook) and their Ray Data actor.

tok = load_tokenizer("dalle", "s3://b/dalle_encoder.safetensors")
ids = tok(uint8 [B, 3, T, T])   # int16 [B, g*g]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def load_tokenizer(
    kind: str, weights: str, storage_cfg: Any = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A function uint8 [B, 3, T, T] → int16 token ids [B, g*g]."""
    import torch

    if kind == "dalle":
        from beit_ray.data.tokenizers.dalle import load_encoder

        model: Any = load_encoder(weights, storage_cfg)
    elif kind == "codebook":
        from beit_ray.data.tokenizers.codebook import Codebook

        model = Codebook.load(weights, storage_cfg)
    else:
        raise ValueError(f"unknown tokenizer {kind!r}")
    if model.vocab_size > 32768:
        raise ValueError(f"vocabulary of {model.vocab_size} does not fit int16 token ids")

    def tokenize(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return (
                model.tokenize(torch.from_numpy(np.ascontiguousarray(pixels)))
                .numpy()
                .astype(np.int16)
            )

    return tokenize


class TokenizerActor:
    """Ray Data actor stage: ``tokenizer_pixels`` → ``visual_token_ids`` (int16 [B, N])."""

    def __init__(self, kind: str, weights: str, st: Any = None) -> None:
        self.tokenize = load_tokenizer(kind, weights, st)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch.pop("tokenizer_pixels")  # [B, 3, T, T]
        if len(pixels):
            batch["visual_token_ids"] = self.tokenize(pixels)
        else:
            batch["visual_token_ids"] = np.zeros((0, batch["bool_masked_pos"].shape[1]), np.int16)
        return batch
