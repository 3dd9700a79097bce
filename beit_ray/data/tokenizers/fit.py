"""Fit the codebook tokenizer: patch features from a sample of the source (Ray Data), k-means."""

from __future__ import annotations

import numpy as np
import torch

from beit_ray.data.augment import image_rng
from beit_ray.data.config import FitTokenizerConfig
from beit_ray.data.pipeline import _raw_epochs, pretrain_batch
from beit_ray.data.sources import list_source
from beit_ray.data.tokenizers.codebook import Codebook, kmeans, patch_features


def _features(
    batch: dict[str, np.ndarray], grid: int, per_image: int, seed: int
) -> dict[str, np.ndarray]:
    pix = batch["tokenizer_pixels"]  # [B, 3, T, T]
    if not len(pix):
        return {"feature": np.zeros((0, 3 * (pix.shape[-1] // grid) ** 2 + 3), np.float32)}
    feats = patch_features(pix, grid).numpy()  # [B, N, D]
    out = []
    for i, key in enumerate(batch["key"]):
        pick = image_rng(seed, 0, f"fit:{key}").choice(
            feats.shape[1], min(per_image, feats.shape[1]), replace=False
        )
        out.append(feats[i, pick])
    return {"feature": np.concatenate(out)}  # [B * per_image, D]


def fit_codebook(cfg: FitTokenizerConfig) -> Codebook:
    """Sample images, extract cell features in Ray Data tasks, run k-means on the driver."""
    d, c = cfg.data, cfg.codebook
    listing = list_source(d, cfg.storage, cfg.input or d.source)
    order = image_rng(d.seed, 0, "<fit-sample>").permutation(len(listing.units))
    if listing.layout == "folders":
        listing.units = [listing.units[i] for i in order[: c.sample_images]]
    raw = _raw_epochs(listing, d, cfg.storage, None, 0, 1).limit(c.sample_images)
    ds = raw.map_batches(
        pretrain_batch,
        fn_kwargs={"cfg": d, "errors_uri": d.errors_uri, "st": cfg.storage},
        batch_size=d.batch_size,
    )
    ds = ds.map_batches(
        _features,
        fn_kwargs={"grid": d.grid, "per_image": c.patches_per_image, "seed": d.seed},
        batch_size=d.batch_size,
    )
    feats = np.concatenate(
        [b["feature"] for b in ds.iter_batches(batch_size=4096, batch_format="numpy")]
    )
    gen = torch.Generator().manual_seed(d.seed)
    centroids = kmeans(torch.from_numpy(feats), c.vocab_size, c.iterations, gen)
    book = Codebook(centroids, d.grid)
    book.save(cfg.output, cfg.storage)
    return book
