"""The Ray Data graphs: masked-patch pretraining rows and labelled fine-tuning rows.

Pretraining rows (:func:`pretraining_dataset`, also what :func:`~beit_ray.data.materialize.
read_materialized` returns):

    pixel_values      uint8 [3, S, S]   patch view (S = data.image_size), normalize in the consumer
    bool_masked_pos   bool  [N]         N = (S / patch)², row-major, BEiT block mask
    visual_token_ids  int16 [N]         tokenizer codes of the tokenizer view
    key               str               stable image key

With ``data.tokenizer = "none"`` the rows carry ``tokenizer_pixels`` uint8 [3, T, T] instead
of ``visual_token_ids``.

Fresh crops every epoch: crops and masks are a function of (seed, epoch, key). Either build the
dataset per epoch (``pretraining_dataset(cfg, epoch=e)``), or once with ``epochs=E``: it then
yields epochs ``epoch .. epoch+E-1`` back to back (each in its own shuffled input order).

Labelled rows (:func:`labelled_dataset`): ``pixel_values`` uint8 [3, S, S], ``label`` int64,
``key`` str. Decode failures never raise: they are written as jsonl records (key, path,
reason) under ``data.errors_uri`` (logged when unset) and dropped from the stream.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from beit_ray.config import StorageConfig
from beit_ray.data.augment import (
    ClassifyTransform,
    PretrainTransform,
    mean_fill,
)
from beit_ray.data.config import DataConfig
from beit_ray.data.decode import DecodeError
from beit_ray.data.errors import read_errors, write_errors  # noqa: F401 - buffered per task
from beit_ray.data.listing import PartsListing, in_val_split, list_parts, unit_order  # noqa: F401 - in_val_split re-exported
from beit_ray.data.plan import POSITION_COLUMNS, epoch_raw
from beit_ray.data.sources import class_index

log = logging.getLogger(__name__)

PRETRAIN_COLUMNS = ("pixel_values", "bool_masked_pos", "visual_token_ids", "key")
LABELLED_COLUMNS = ("pixel_values", "label", "key")


# --------------------------------------------------------------------------- errors


def _error(row: dict[str, Any], reason: str) -> dict[str, Any]:
    rec = {"key": str(row["key"]), "path": str(row["path"]), "reason": reason.split(" <_io.")[0]}
    for extra in ("epoch", "shard"):
        if extra in row:
            rec[extra] = int(row[extra])
    return rec


def _row(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {k: v[i] for k, v in batch.items()}


def _split_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    n = len(batch["key"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


# --------------------------------------------------------------------------- batch fns


def pretrain_batch(
    batch: dict[str, np.ndarray],
    cfg: DataConfig,
    errors_uri: str | None,
    st: StorageConfig | None,
) -> dict[str, np.ndarray]:
    """Raw rows (+ ``epoch``) → two views + mask; failures become error records."""
    tf = PretrainTransform.from_config(cfg)
    s, t, n = cfg.image_size, cfg.tokenizer_image_size, cfg.grid**2
    size = len(batch["key"])
    # Preallocated outputs: each view is written once (flip + HWC→CHW in one copy), no stack.
    pix = np.empty((size, 3, s, s), np.uint8)  # [B, 3, S, S]
    tok = np.empty((size, 3, t, t), np.uint8)  # [B, 3, T, T]
    masks = np.empty((size, n), bool)  # [B, N]
    keep = np.zeros(size, bool)
    keys, images, errs, epochs = batch["key"], batch["image"], batch["error"], batch["epoch"]
    errors = []
    for k in range(size):
        if errs[k]:
            errors.append(_error(_row(batch, k), str(errs[k])))
            continue
        try:
            tf(images[k], str(keys[k]), int(epochs[k]), out=(pix[k], tok[k], masks[k]))
        except DecodeError as e:
            errors.append(_error(_row(batch, k), str(e)))
            continue
        except Exception as e:  # a bug in a codec must not kill a 14M-image job either
            errors.append(_error(_row(batch, k), f"failed: {type(e).__name__}: {e}"))
            continue
        keep[k] = True
    write_errors(errors, errors_uri, st)
    ok = None if keep.all() else np.flatnonzero(keep)  # views, not copies, when nothing failed
    out = {
        "pixel_values": pix if ok is None else pix[ok],
        "bool_masked_pos": masks if ok is None else masks[ok],
        "tokenizer_pixels": tok if ok is None else tok[ok],
        "key": np.array([str(x) for x in (keys if ok is None else keys[ok])], dtype=object),
    }
    return carry(batch, out, ok)


CARRIED = ("shard", *POSITION_COLUMNS)
"""Columns that ride along a decode stage: the materialized shard of a row, its place in the
epoch (exact resume)."""


def carry(
    batch: dict[str, np.ndarray], out: dict[str, np.ndarray], kept: np.ndarray | None
) -> dict[str, np.ndarray]:
    """``out`` + the :data:`CARRIED` columns of ``batch`` for its ``kept`` rows (None: all)."""
    for c in CARRIED:
        if c in batch:
            out[c] = np.asarray(batch[c] if kept is None else np.asarray(batch[c])[kept], np.int64)
    return out


def labelled_batch(
    batch: dict[str, np.ndarray],
    cfg: DataConfig,
    train: bool,
    errors_uri: str | None,
    st: StorageConfig | None,
) -> dict[str, np.ndarray]:
    tf = ClassifyTransform(
        cfg.image_size, train, crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
        max_pixels=cfg.max_pixels, draft=cfg.draft, seed=cfg.seed,
        rand_augment=cfg.rand_augment, fill=mean_fill(cfg.normalization),
        region_decode=cfg.region_decode, crop_pct=cfg.crop_pct, flip=cfg.flip,
    )  # fmt: skip
    s = cfg.image_size
    pix, labels, keys, kept, errors = [], [], [], [], []
    for k, row in enumerate(_split_rows(batch)):
        if row["error"]:
            errors.append(_error(row, str(row["error"])))
            continue
        try:
            pix.append(tf(row["image"], str(row["key"]), int(row["epoch"])))
        except Exception as e:
            errors.append(_error(row, str(e) if isinstance(e, DecodeError) else f"failed: {e!r}"))
            continue
        labels.append(int(row["label"]))
        keys.append(str(row["key"]))
        kept.append(k)
    write_errors(errors, errors_uri, st)
    out = {
        "pixel_values": np.stack(pix) if pix else np.zeros((0, 3, s, s), np.uint8),
        "label": np.array(labels, dtype=np.int64),
        "key": np.array(keys, dtype=object),
    }
    return carry(batch, out, np.array(kept, dtype=np.int64))


# --------------------------------------------------------------------------- datasets


def _epochs(
    listing: PartsListing,
    cfg: DataConfig,
    st: StorageConfig | None,
    classes: list[str] | None,
    epoch: int,
    epochs: int,
    clock: Any,
    split: str | None = None,
    shuffle: bool = True,
):  # noqa: ANN202
    """Raw rows: one epoch per pass set by ``clock``, else epochs [epoch, epoch + epochs)."""
    kw = dict(split=split, shuffle=shuffle)
    if clock is not None:
        return epoch_raw(listing, cfg, st, classes, clock=clock, **kw)
    out = None
    for e in range(epoch, epoch + epochs):
        ds = epoch_raw(listing, cfg, st, classes, epoch=e, **kw)
        out = ds if out is None else out.union(ds)
    return out


def add_tokenizer(ds, cfg: DataConfig, st: StorageConfig | None = None):  # noqa: ANN001, ANN201
    """Append the tokenizer actor stage: tokenizer_pixels → visual_token_ids."""
    import ray

    from beit_ray.data.tokenizers import TokenizerActor

    if cfg.tokenizer == "none":
        return ds
    if not cfg.tokenizer_weights:
        raise ValueError(
            "data.tokenizer_weights: the DALL-E tokenizer needs converted weights "
            "(python -m beit_ray.data.tokenizers.dalle convert ...), or use data.tokenizer=codebook"
        )
    from beit_ray.runtime import tokenizer_gpus

    # Unset (a tokenize job; training resolves it first, knowing its workers' GPUs): GPU actors
    # when the cluster has GPU nodes, also ones the autoscaler has not started. GPU actors then
    # wait for a GPU node (Ray Data waits for the pool's first actors), never fall back to CPU.
    gpus = tokenizer_gpus(cfg.tokenizer_num_gpus, announce=True)
    lo, hi = cfg.tokenizer_actors
    return ds.map_batches(
        TokenizerActor,
        fn_constructor_kwargs={"kind": cfg.tokenizer, "weights": cfg.tokenizer_weights, "st": st},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_gpus=gpus or None,
        # Fractional CPUs: actors holding every CPU starve the read tasks (a silent hang).
        num_cpus=cfg.tokenizer_num_cpus,
    )


def pretraining_dataset(
    cfg: DataConfig,
    epoch: int = 0,
    epochs: int = 1,
    storage_cfg: StorageConfig | None = None,
    errors_uri: str | None = None,
    listing: PartsListing | None = None,
    clock: Any = None,
):  # noqa: ANN201 - ray.data.Dataset
    """Streaming masked-patch rows (module docstring) for Ray Train's ``datasets=``: one epoch
    per pass as ``clock`` (:func:`~beit_ray.data.plan.make_clock`) says, or the epochs
    [epoch, epoch + epochs) back to back."""
    st = storage_cfg
    listing = listing or list_parts(cfg, st, count=False)
    raw = _epochs(listing, cfg, st, None, epoch, epochs, clock)
    return masked_rows(raw, cfg, errors_uri, st)


def masked_rows(
    raw, cfg: DataConfig, errors_uri: str | None = None, st: StorageConfig | None = None
):  # noqa: ANN001, ANN201
    """Raw rows (with ``epoch``) → masked-patch rows: decode/augment/mask tasks, tokenizer actors."""
    ds = raw.map_batches(
        pretrain_batch,
        fn_kwargs={"cfg": cfg, "errors_uri": errors_uri or cfg.errors_uri, "st": st},
        batch_size=cfg.batch_size,
    )
    return with_reservation(add_tokenizer(ds, cfg, st), cfg, actor_stage=cfg.tokenizer != "none")


def with_reservation(ds, cfg: DataConfig, actor_stage: bool = False):  # noqa: ANN001, ANN201
    """``ds`` executing with ``cfg.reserve_per_operator`` (the dataset's own DataContext copy);
    unset, reservation is on only for graphs with an ``actor_stage``."""
    on = cfg.reserve_per_operator
    ds.context.op_resource_reservation_enabled = actor_stage if on is None else on
    return ds


def labelled_dataset(
    cfg: DataConfig,
    split: str = "train",
    *,
    train_augment: bool | None = None,
    val_fraction: float | None = None,
    epoch: int = 0,
    epochs: int = 1,
    storage_cfg: StorageConfig | None = None,
    errors_uri: str | None = None,
    classes_write_to: str | None = None,
    source: str | None = None,
    listing: PartsListing | None = None,
    clock: Any = None,
):  # noqa: ANN201 - ray.data.Dataset
    """Classification rows {pixel_values uint8 [3,S,S], label int64, key} of ``split``.

    ``split`` is "train" or "val". With ``val_fraction``, both come from ``source`` (class
    folders and class tars: by key hash, :func:`in_val_split`; WebDataset and parquet: whole
    shards by their name's hash); without it, ``source`` (default ``cfg.source``) is taken
    whole. Train rows get random-resized crop + flip (+ RandAugment), new every epoch
    (``clock`` or ``epoch``); val rows the eval transform (``train_augment`` overrides). The
    class index is :func:`~beit_ray.data.sources.class_index` (read, or written to
    ``classes_write_to``). Pass the ``listing`` (:func:`list_parts`) to list the source once.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    st = storage_cfg
    listing = listing or list_parts(cfg, st, source, val_fraction=val_fraction, count=False)
    classes = class_index(listing, cfg, st, classes_write_to)
    train = split == "train" if train_augment is None else train_augment
    which = split if val_fraction is not None else None
    ds = _epochs(listing, cfg, st, classes, epoch, epochs, clock, which, shuffle=train)
    ds = ds.map_batches(
        labelled_batch,
        fn_kwargs={
            "cfg": cfg,
            "train": train,
            "errors_uri": errors_uri or cfg.errors_uri,
            "st": st,
        },
        batch_size=cfg.batch_size,
    )
    return with_reservation(ds, cfg)


def classes_for(
    cfg: DataConfig,
    storage_cfg: StorageConfig | None = None,
    write_to: str | None = None,
    listing: PartsListing | None = None,
) -> list[str] | None:
    """The class names (id order) the labelled dataset of ``cfg.source`` uses."""
    listing = listing or list_parts(cfg, storage_cfg, count=False)
    return class_index(listing, cfg, storage_cfg, write_to)
