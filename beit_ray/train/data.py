"""The Ray datasets a training job feeds to ``TorchTrainer(datasets=...)``.

Each dataset is one epoch; Ray Train runs it once per pass, and the epoch clock that rank 0
sets before each pass makes every pass a new epoch: its own input order, crops, flips,
RandAugment ops and masks (``beit_ray.data.plan``). Pretraining streams the masked-patch
pipeline or reads shards materialized by jobs/tokenize_shards.py; fine-tuning reads labelled
rows and a validation split. The source is listed once per run, into ``<run>/listing``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

from beit_ray import storage
from beit_ray.runtime import ray_data_cpus
from beit_ray.train.config import FinetuneConfig, PretrainConfig


@dataclass
class TrainData:
    """Datasets by name ("train", "val"), passes over "train", and class names if any."""

    datasets: dict[str, Any]
    passes: int
    id2label: dict[int, str] = field(default_factory=dict)
    rows_per_pass: int | None = None
    """Known without reading the data (the listing, parquet footers, tar headers, a manifest);
    unset: counted (materialized shards: from parquet footers)."""
    ray_data_cpus: float = 1.0
    """CPUs Ray Data holds on to while training (actor pools) plus one for read tasks."""
    clock: Any = None
    """The :class:`~beit_ray.data.plan.EpochClock` of "train": rank 0 sets the epoch of each
    pass (a pass is one epoch, with its own order, crops, flips and masks)."""
    positions: bool = False
    """"train" rows carry their place in the epoch (``plan.POSITION_COLUMNS``): checkpoints
    record what was trained on, and a resumed epoch skips exactly that."""


def pretraining_data(cfg: PretrainConfig) -> TrainData:
    from beit_ray.data.listing import list_parts
    from beit_ray.data.materialize import read_materialized
    from beit_ray.data.pipeline import pretraining_dataset, with_reservation
    from beit_ray.data.plan import make_clock

    if cfg.shards:
        shards = with_reservation(read_materialized(cfg.shards, cfg.storage), cfg.data)
        return TrainData({"train": shards}, cfg.run.epochs)
    listing = list_parts(cfg.data, cfg.storage, uri=_listing_uri(cfg, "listing"))
    clock = make_clock()
    data = with_tokenizer_device(cfg)
    ds = pretraining_dataset(data, storage_cfg=cfg.storage, listing=listing, clock=clock)
    return TrainData(
        {"train": ds}, cfg.run.epochs, rows_per_pass=cfg.data.images_per_epoch or listing.images(),
        ray_data_cpus=ray_data_cpus(cfg), clock=clock, positions=True,
    )  # fmt: skip


def with_tokenizer_device(cfg: PretrainConfig) -> Any:
    """``cfg.data`` with ``tokenizer_num_gpus`` decided (and said) here: unset, the pipeline alone
    cannot tell that training holds GPUs, so GPU nodes exist even when none is up yet."""
    if cfg.data.tokenizer == "none" or cfg.data.tokenizer_num_gpus is not None:
        return cfg.data
    from beit_ray.runtime import Cluster, tokenizer_gpus

    data = copy.copy(cfg.data)
    data.tokenizer_num_gpus = tokenizer_gpus(
        None, Cluster.read(cfg.ray), train_gpus=cfg.scaling.use_gpu, announce=True
    )
    return data


def finetuning_data(cfg: FinetuneConfig) -> TrainData:
    """Classification: labelled rows, validation from val_source or a key-hash split; the
    source is listed once (into <run>/listing) and every dataset reads that listing."""
    if cfg.task == "segmentation":
        return segmentation_data(cfg)
    from beit_ray.data.listing import list_parts
    from beit_ray.data.pipeline import classes_for, labelled_dataset
    from beit_ray.data.plan import make_clock

    classes_uri = storage.join(_run(cfg), "classes.json")
    clock = make_clock()
    common: dict[str, Any] = {"storage_cfg": cfg.storage, "classes_write_to": classes_uri}
    frac = None if cfg.val_source else cfg.val_fraction
    listing = list_parts(cfg.data, cfg.storage, uri=_listing_uri(cfg, "listing"), val_fraction=frac)
    train = labelled_dataset(
        cfg.data, "train", val_fraction=frac, listing=listing, clock=clock, **common
    )
    if cfg.val_source:
        val_listing = list_parts(
            cfg.data, cfg.storage, cfg.val_source, uri=_listing_uri(cfg, "listing-val")
        )
        val = labelled_dataset(cfg.data, "val", listing=val_listing, **common)
    else:
        val = labelled_dataset(cfg.data, "val", val_fraction=frac, listing=listing, **common)
    names = classes_for(cfg.data, cfg.storage, classes_uri, listing=listing) or []
    if len(names) < 2:
        raise ValueError(
            f"data.source {cfg.data.source}: classification needs at least 2 classes, found {names}"
        )
    rows = cfg.data.images_per_epoch or listing.images("train" if frac else None)
    return TrainData(
        {"train": train, "val": val}, cfg.run.epochs, dict(enumerate(names)),
        rows_per_pass=rows, clock=clock, positions=True,
    )  # fmt: skip


def segmentation_data(cfg: FinetuneConfig) -> TrainData:
    """ADE20k layout: images/{training,validation} + annotations/{training,validation}."""
    from beit_ray.data.pipeline import with_reservation
    from beit_ray.data.segmentation import segmentation_dataset

    common: dict[str, Any] = {
        "crop_size": cfg.data.image_size,
        "scale": cfg.seg_scale,
        "reduce_zero_label": cfg.reduce_labels,
        "seed": cfg.data.seed,
        "storage_cfg": cfg.storage,
        "errors_uri": cfg.data.errors_uri,
        "flip": cfg.data.flip,
    }
    # data.reserve_per_operator holds here too (the other layouts' builders apply it themselves)
    from beit_ray.data.plan import make_clock

    clock = make_clock()
    train = segmentation_dataset(cfg.data.source, "training", clock=clock, **common)
    train = with_reservation(train, cfg.data)
    val = with_reservation(
        segmentation_dataset(cfg.val_source or cfg.data.source, "validation", **common), cfg.data
    )
    names = _seg_names(cfg)
    return TrainData(
        {"train": train, "val": val}, cfg.run.epochs, dict(enumerate(names)), clock=clock
    )


def _seg_names(cfg: FinetuneConfig) -> list[str]:
    """Class names from <source>/id2label.json ({"0": "wall", ...}) or num_labels placeholders."""
    path = storage.join(cfg.data.source, "id2label.json")
    if storage.exists(path, cfg.storage):
        raw = json.loads(storage.read_text(path, cfg.storage))
        return [str(raw[k]) for k in sorted(raw, key=int)]
    if not cfg.num_labels:
        raise ValueError(f"segmentation: give num_labels or put id2label.json in {cfg.data.source}")
    return [f"class_{i}" for i in range(cfg.num_labels)]


def _run(cfg: Any) -> str:
    base = cfg.checkpoint.storage_path
    return storage.join(
        base if storage.is_remote(base) else os.path.abspath(base), cfg.checkpoint.name
    )


def _listing_uri(cfg: Any, name: str) -> str:
    """The run's listing folder (reused on resume), unless data.listing_uri says otherwise."""
    if cfg.data.listing_uri:
        return (
            storage.join(cfg.data.listing_uri, name) if name != "listing" else cfg.data.listing_uri
        )
    return storage.join(_run(cfg), name)
