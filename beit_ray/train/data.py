"""The Ray datasets a training job feeds to ``TorchTrainer(datasets=...)``.

Pretraining streams the masked-patch pipeline (every epoch laid out in one dataset, each with
its own crops and masks: one pass) or reads shards materialized by jobs/tokenize_shards.py (iterated
once per epoch). Fine-tuning reads labelled rows and a validation split.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from beit_ray import storage
from beit_ray.train.config import FinetuneConfig, PretrainConfig


@dataclass
class TrainData:
    """Datasets by name ("train", "val"), passes over "train", and class names if any."""

    datasets: dict[str, Any]
    passes: int
    id2label: dict[int, str] = field(default_factory=dict)
    rows_per_pass: int | None = None
    """Known without reading the data (listed image files); unset: counted, which runs the pipeline."""
    ray_data_cpus: float = 1.0
    """CPUs Ray Data holds on to while training (actor pools) plus one for read tasks."""


def pretraining_data(cfg: PretrainConfig) -> TrainData:
    from beit_ray.data.materialize import read_materialized
    from beit_ray.data.pipeline import pretraining_dataset, with_reservation

    if cfg.shards:
        shards = with_reservation(read_materialized(cfg.shards, cfg.storage), cfg.data)
        return TrainData({"train": shards}, cfg.run.epochs)
    from beit_ray.data.sources import list_source

    listing = list_source(cfg.data, cfg.storage)
    ds = pretraining_dataset(
        cfg.data, epoch=0, epochs=cfg.run.epochs, storage_cfg=cfg.storage, listing=listing
    )
    rows = len(listing.units) * cfg.run.epochs if listing.layout == "folders" else None
    actors = (
        cfg.data.tokenizer_actors[0] * cfg.data.tokenizer_num_cpus
        if cfg.data.tokenizer != "none"
        else 0.0
    )
    return TrainData({"train": ds}, 1, rows_per_pass=rows, ray_data_cpus=1.0 + actors)


def finetuning_data(cfg: FinetuneConfig) -> TrainData:
    """Classification: labelled rows, validation from val_source or a key-hash split."""
    if cfg.task == "segmentation":
        return segmentation_data(cfg)
    from beit_ray.data.pipeline import classes_for, labelled_dataset

    classes_uri = storage.join(_run(cfg), "classes.json")
    common: dict[str, Any] = {"storage_cfg": cfg.storage, "classes_write_to": classes_uri}
    if cfg.val_source:
        train = labelled_dataset(cfg.data, "train", **common)
        val = labelled_dataset(cfg.data, "val", source=cfg.val_source, **common)
    else:
        train = labelled_dataset(cfg.data, "train", val_fraction=cfg.val_fraction, **common)
        val = labelled_dataset(cfg.data, "val", val_fraction=cfg.val_fraction, **common)
    names = classes_for(cfg.data, cfg.storage, classes_uri) or []
    if len(names) < 2:
        raise ValueError(
            f"data.source {cfg.data.source}: classification needs at least 2 classes, found {names}"
        )
    return TrainData({"train": train, "val": val}, cfg.run.epochs, dict(enumerate(names)))


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
    }
    # data.reserve_per_operator holds here too (the other layouts' builders apply it themselves)
    train = with_reservation(segmentation_dataset(cfg.data.source, "training", **common), cfg.data)
    val = with_reservation(
        segmentation_dataset(cfg.val_source or cfg.data.source, "validation", **common), cfg.data
    )
    names = _seg_names(cfg)
    return TrainData({"train": train, "val": val}, cfg.run.epochs, dict(enumerate(names)))


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
