"""Listing into parquet parts, epoch plans and shuffling: what learning and scale both need.

Unit tests list with threads (no Ray); the integration tests run the epoch plan on real Ray.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit_ray import storage
from beit_ray.data.config import DataConfig
from beit_ray.data.listing import PART_ROWS, in_val_split, list_parts, read_part
from beit_ray.data.plan import (
    MAX_SLICES_PER_EPOCH,
    POSITION_COLUMNS,
    EpochProgress,
    epoch_groups,
    slices,
)

TINY = dict(image_size=32, patch_size=8, tokenizer_image_size=32, tokenizer="none")
CLASSES = [f"c{i}" for i in range(10)]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    """10 class folders × 30 small JPEGs, in class order on disk (as ImageNet is)."""
    root = tmp_path_factory.mktemp("plan") / "src"
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(30):
            (root / name / f"{i:03d}.jpg").write_bytes(_jpeg(100 * c + i))
    return str(root)


def _class_tars(tree: str, dest: Path) -> Path:
    """The tree's class folders as one tar per class (ImageNet-22k's layout)."""
    import tarfile

    dest.mkdir()
    for name in CLASSES:
        with tarfile.open(dest / f"{name}.tar", "w") as tar:
            for f in sorted(Path(tree, name).iterdir()):
                tar.add(f, arcname=f.name)
    return dest


def _entropy(labels: list[int]) -> float:
    n = len(labels)
    return -sum(k / n * math.log2(k / n) for k in Counter(labels).values())


# --------------------------------------------------------------------------- unit


def test_listing_parts_are_shuffled_counted_and_reused(tree: str, tmp_path: Path) -> None:
    cfg = DataConfig(source=tree, **TINY)
    uri = str(tmp_path / "listing")
    listing = list_parts(cfg, uri=uri, val_fraction=0.2)
    assert listing.layout == "folders" and listing.classes == CLASSES
    assert listing.images() == 300
    part = read_part(listing.units[0])
    assert len(part["path"]) == min(300, PART_ROWS)
    # Shuffled across classes: the first 30 files of a part are not one class folder.
    assert len({k.split("/")[0] for k in part["key"][:30]}) >= 5
    val = sum(in_val_split(k, 0.2, cfg.seed) for k in part["key"])
    assert listing.images("val") == val and listing.images("train") == 300 - val
    # A read slice reads its rows from the row groups that hold them (64 rows a group).
    import pyarrow.parquet as pq

    assert pq.ParquetFile(listing.units[0]).metadata.num_row_groups == -(-300 // 64)
    some = read_part(listing.units[0], None, 70, 140)
    assert some["key"] == part["key"][70:140] and some["path"] == part["path"][70:140]
    index = json.loads(Path(uri, "_index.json").read_text())
    assert index["rows"] == listing.rows
    # A second call reads the index back instead of listing again (a new file is not seen).
    Path(tree, "c0", "new.jpg").write_bytes(_jpeg(9999))
    try:
        again = list_parts(cfg, uri=uri, val_fraction=0.2)
        assert again.images() == 300 and again.units == listing.units
        assert list_parts(cfg, uri=str(tmp_path / "fresh")).images() == 301
    finally:
        os.remove(os.path.join(tree, "c0", "new.jpg"))


def test_manifest_replaces_listing(tree: str, tmp_path: Path) -> None:
    keys = [f"{c}/{i:03d}.jpg" for c in CLASSES[:3] for i in range(30)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("key\n" + "\n".join(keys) + "\n")
    cfg = DataConfig(source=tree, manifest=str(manifest), **TINY)
    listing = list_parts(cfg, uri=str(tmp_path / "l"))
    assert listing.images() == 90 and listing.classes == CLASSES[:3]


def test_slices_cover_each_file_once_and_stay_few(tree: str, tmp_path: Path) -> None:
    cfg = DataConfig(source=tree, **TINY)
    listing = list_parts(cfg, uri=str(tmp_path / "l"))
    plan = slices(listing, cfg, None)
    assert sum(c for _, _, c in plan) == 300 and all(c <= 64 for _, _, c in plan)
    # A huge source (20M files) still has at most MAX_SLICES_PER_EPOCH read tasks an epoch,
    # each reading several slices, every file once.
    listing.rows = [PART_ROWS] * 20_000
    listing.units = listing.units * 20_000
    big = epoch_groups(listing, cfg, None, epoch=3)
    assert len(big) <= MAX_SLICES_PER_EPOCH
    assert sum(c for g in big for _, _, c in g) == 20_000 * PART_ROWS


# --------------------------------------------------------------------------- on Ray


@pytest.mark.integration
def test_each_epoch_reads_new_order_and_new_crops(ray_session, tree: str, tmp_path: Path) -> None:
    from beit_ray.data.pipeline import labelled_dataset
    from beit_ray.data.plan import make_clock

    cfg = DataConfig(source=tree, rand_augment=None, **TINY)
    listing = list_parts(cfg, uri=str(tmp_path / "l"))
    clock = make_clock()
    ds = labelled_dataset(cfg, "train", listing=listing, clock=clock)
    passes = []
    for epoch in range(2):
        ray_session.get(clock.set.remote(epoch))
        passes.append({r["key"]: r["pixel_values"] for r in ds.iter_rows()})
    assert set(passes[0]) == set(passes[1]) and len(passes[0]) == 300
    differ = sum(not np.array_equal(passes[0][k], passes[1][k]) for k in passes[0])
    assert differ >= 290  # fresh crop and flip for (nearly) every image
    # Same epoch again: the same pixels (resumable, reproducible).
    ray_session.get(clock.set.remote(1))
    rows = list(ds.iter_rows())
    again = {r["key"]: r["pixel_values"] for r in rows}
    assert all(np.array_equal(again[k], passes[1][k]) for k in again)
    # A resumed epoch leaves out exactly the rows trained on (any 128 of them, as the ranks of
    # a run took them), whole read groups and single rows of groups in flight alike.
    taken = rows[::2][:100] + rows[1::2][-28:]
    progress = EpochProgress()
    progress.add(*([r[c] for r in taken] for c in POSITION_COLUMNS))
    ray_session.get(clock.set.remote(1, progress.to_json()))
    rest = [r["key"] for r in ds.iter_rows()]
    assert len(rest) == len(set(rest)) == 300 - 128
    assert set(rest) == set(again) - {r["key"] for r in taken}


@pytest.mark.integration
def test_batches_mix_classes_like_the_dataset(ray_session, tree: str, tmp_path: Path) -> None:
    """Class entropy of a 32-row batch, as the training loop iterates (shuffle buffer on)."""
    from beit_ray.data.pipeline import labelled_dataset

    cfg = DataConfig(source=tree, rand_augment=None, **TINY)
    ds = labelled_dataset(cfg, "train", listing=list_parts(cfg, uri=str(tmp_path / "l")))
    full = _entropy([i for i in range(10) for _ in range(30)])  # log2(10)
    batches = list(
        ds.iter_batches(batch_size=32, local_shuffle_buffer_size=cfg.shuffle_buffer, drop_last=True)
    )
    mean = np.mean([_entropy(b["label"].tolist()) for b in batches])
    # A batch of 32 drawn uniformly from 10 classes has ~3.03 bits on average; one class: 0.
    assert mean >= 0.9 * 3.03, (mean, full)


def test_class_tar_validation_reads_only_the_indexed_members(
    tree: str, tmp_path: Path, monkeypatch
) -> None:
    """Counting class tars also indexes their validation members (offset, size): the val split
    is read from those ranges alone, never by streaming the tars; train keeps the rest."""

    from beit_ray.data import plan, sources

    src = _class_tars(tree, tmp_path / "tars")
    cfg = DataConfig(source=str(src), **TINY)
    listing = list_parts(cfg, uri=str(tmp_path / "l"), val_fraction=0.2)
    want = {f"{c}/{i:03d}.jpg" for c in CLASSES for i in range(30)}
    want_val = {k for k in want if in_val_split(k, 0.2, cfg.seed)}
    assert listing.val_parts and sum(listing.val_part_rows) == len(want_val) == listing.images(
        "val"
    )
    again = list_parts(cfg, uri=str(tmp_path / "l"), val_fraction=0.2)  # read back: same index
    assert again.val_parts == listing.val_parts

    def read(split: str) -> list[dict]:
        groups = epoch_groups(listing, cfg, split, 0, shuffle=False)
        batch = {"id": np.arange(len(groups))}
        blocks = plan.read_positions(batch, listing, cfg, None, CLASSES, split, None, 0, False)
        return [{c: b[c][i] for c in b} for b in blocks for i in range(len(b["key"]))]

    real_iter_unit = sources.iter_unit

    def no_streaming(*a, **k):
        raise AssertionError("the val split streamed a tar")

    monkeypatch.setattr(sources, "iter_unit", no_streaming)
    val = read("val")
    assert {r["key"] for r in val} == want_val and not any(r["error"] for r in val)
    for r in val:  # the member's bytes, labelled with its tar's class
        c, name = r["key"].split("/")
        assert r["image"] == Path(tree, c, name).read_bytes() and r["label"] == CLASSES.index(c)
    monkeypatch.setattr(sources, "iter_unit", real_iter_unit)
    train = read("train")
    assert {r["key"] for r in train} == want - want_val


@pytest.mark.integration
def test_class_tars_are_interleaved_by_the_read_tasks(
    ray_session, tree: str, tmp_path: Path
) -> None:
    """One class per tar: without any shuffle buffer a batch still spans several classes."""

    from beit_ray.data.pipeline import labelled_dataset

    src = _class_tars(tree, tmp_path / "tars")
    cfg = DataConfig(source=str(src), rand_augment=None, shuffle_buffer=0, **TINY)
    listing = list_parts(cfg, uri=str(tmp_path / "l"))
    assert listing.layout == "class_tars" and listing.images() == 300  # counted from headers
    ds = labelled_dataset(cfg, "train", listing=listing)
    batches = list(ds.iter_batches(batch_size=32, drop_last=True))
    mean = np.mean([_entropy(b["label"].tolist()) for b in batches])
    assert mean >= 2.0, mean  # 8 tars a task: ~3 bits; one tar a task would give 0


@pytest.mark.integration
def test_val_split_reads_only_val_files_and_on_s3_one_get_each(
    ray_session, tree: str, tmp_path: Path, s3_bucket: str
) -> None:
    from beit_ray.data.pipeline import labelled_dataset

    src = f"s3://{s3_bucket}/src"
    storage.upload_dir(tree, src)
    cfg = DataConfig(source=src, rand_augment=None, **TINY)
    listing = list_parts(cfg, uri=f"s3://{s3_bucket}/listing", val_fraction=0.1)
    val = labelled_dataset(cfg, "val", val_fraction=0.1, listing=listing).take_all()
    train = labelled_dataset(cfg, "train", val_fraction=0.1, listing=listing).take_all()
    assert len(val) == listing.images("val") and len(train) == listing.images("train")
    assert {r["key"] for r in val}.isdisjoint({r["key"] for r in train})
    assert len(val) + len(train) == 300
