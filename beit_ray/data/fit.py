"""Fit the codebook tokenizer: patch features from a sample of the source (Ray Data), k-means."""

from __future__ import annotations

import os

import numpy as np
import torch

from beit_ray import storage
from beit_ray.data.augment import image_rng
from beit_ray.data.config import FitTokenizerConfig
from beit_ray.data.listing import list_parts
from beit_ray.data.pipeline import pretrain_batch
from beit_ray.data.plan import epoch_raw
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


def listing_uri(cfg: FitTokenizerConfig) -> str:
    """Where the fit lists its source: ``data.listing_uri``, else beside the codebook (storage
    every node reads, as the codebook's). A local output is made absolute on the driver: Ray
    tasks write the listing's parts, and a relative path would land in each node's own copy of
    a submitted job's working dir."""
    if cfg.data.listing_uri:
        return cfg.data.listing_uri
    out = cfg.output.rstrip("/")
    if not storage.is_remote(out):
        out = os.path.abspath(storage.strip_scheme(out))
    return storage.join(out.rsplit("/", 1)[0], "_listing-codebook")


def fit_codebook(cfg: FitTokenizerConfig) -> Codebook:
    """Sample images, extract cell features in Ray Data tasks, run k-means on the driver."""
    d, c = cfg.data, cfg.codebook
    listing = list_parts(d, cfg.storage, cfg.input or d.source, uri=listing_uri(cfg), count=False)
    # the first images of epoch 0: its slices come in a seeded order, and listing parts mix
    # their classes, so a few slices already sample many classes
    raw = epoch_raw(listing, d, cfg.storage, None, epoch=0).limit(c.sample_images)
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
