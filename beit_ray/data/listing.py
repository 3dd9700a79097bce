"""List a source once, into parquet, without holding its file list on the driver.

    listing = list_parts(cfg.data, st, uri=<run>/listing, val_fraction=0.05)
    listing.units          # part files (class folders) or the tars / parquet files themselves
    listing.rows           # images per unit, known without reading any image
    listing.images(split)  # images in "train" / "val" / None (all)

On disk (local or s3://), written once and reused by every later call with the same source,
layout, seed and split (a resumed run reads it back instead of listing again)::

    <uri>/_index.json                      source, layout, classes, units, rows per unit
    <uri>/part-r<run>-<k>.parquet          class folders: {path, key, class, size} rows

Class folders (or any tree of images, or a flat prefix) are walked by :func:`walk.walk`, the one
listing of every job: parallel tasks over runs of top-level folders (local) or key ranges (S3),
each shuffling its run of files by (seed, run) into parts of ``PART_ROWS`` rows, so a part, the
unit that training reads, holds files of many classes. Tars, WebDataset shards and parquet
files are their own units (walked the same way; a source holds thousands of them, not
millions); their rows come from parquet footers and tar headers, read in parallel tasks when
first needed, or from ``data.images_per_epoch``.

A user's manifest (``data.manifest``: parquet or CSV with a ``path`` or ``key`` column, e.g. an
S3 Inventory report) replaces the folder listing: it is read in Ray tasks and written as parts.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from beit_ray import storage
from beit_ray.config import StorageConfig
from beit_ray.data import containers
from beit_ray.data.augment import image_rng, stable_hash
from beit_ray.data.config import DataConfig
from beit_ray.data.sources import IMAGE_SUFFIXES, TAR_SUFFIXES, relative_key, tar_stem
from beit_ray.data.walk import first_look, run_tasks, walk

log = logging.getLogger(__name__)

PART_ROWS = 1024
"""Files per listing part: one read task reads a part (at ~1 ms a file, about a second)."""
PART_GROUP_ROWS = 64
"""Rows per row group of a listing part: an epoch's read slice (at least 64 files) reads the
row groups it needs, not the whole part (16 reads of each part an epoch before)."""
INDEX = "_index.json"
VERSION = 1


def in_val_split(key: str, val_fraction: float, seed: int = 0) -> bool:
    """Deterministic train/val assignment by key hash (same answer in every job and run)."""
    return stable_hash(f"{seed}:{key}") % 1_000_000 < val_fraction * 1_000_000


@dataclass
class PartsListing:
    """A listed source: its layout and units, with image counts per unit."""

    layout: str
    root: str
    units: list[str]
    """Full URIs: listing parts (folders) or tar / parquet files, sorted."""
    rows: list[int] | None = None
    """Images per unit; None until counted (tars without ``data.images_per_epoch``)."""
    val_rows: list[int] | None = None
    """Of those, images in the validation split (``val_fraction``), per unit."""
    classes: list[str] | None = None
    """Class names found (folders, class tars), sorted."""
    val_fraction: float | None = None
    """The split the counts were made for; units then hold both splits, told apart by key hash
    (folders, class tars) or by unit (WebDataset, parquet: whole shards go to one split)."""
    seed: int = 0
    uri: str = ""
    val_parts: list[str] | None = None
    """Class tars with a split: parquet parts indexing the validation members (tar, member,
    byte offset, size), so an evaluation reads those members alone, one ranged read each."""
    val_part_rows: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def parts(self) -> bool:
        return self.layout == "folders"

    def images(self, split: str | None = None) -> int | None:
        """Images in ``split`` ("train", "val", None = all) without reading any, or None."""
        if self.rows is None:
            return None
        total = sum(self.rows)
        if split is None or self.val_fraction is None:
            return total
        val = sum(self.val_rows or [0] * len(self.rows))
        return val if split == "val" else total - val

    def unit_split(self, unit: str) -> str | None:
        """WebDataset / parquet with a split: the split a whole unit belongs to."""
        if self.val_fraction is None or self.layout not in ("webdataset", "parquet"):
            return None
        key = relative_key(unit, self.root)
        return "val" if in_val_split(key, self.val_fraction, self.seed) else "train"

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": VERSION,
                "layout": self.layout,
                "source": self.root,
                "units": [relative_key(u, self.uri) if self.parts else u for u in self.units],
                "rows": self.rows,
                "val_rows": self.val_rows,
                "classes": self.classes,
                "val_fraction": self.val_fraction,
                "seed": self.seed,
                "val_parts": (
                    None
                    if self.val_parts is None
                    else [relative_key(u, self.uri) for u in self.val_parts]
                ),
                "val_part_rows": self.val_part_rows,
            }
        )

    @classmethod
    def from_json(cls, text: str, uri: str) -> PartsListing:
        d = json.loads(text)
        units = (
            [storage.join(uri, u) for u in d["units"]] if d["layout"] == "folders" else d["units"]
        )
        val_parts = d.get("val_parts")
        return cls(
            d["layout"], d["source"], units, d["rows"], d["val_rows"], d["classes"],
            d["val_fraction"], d["seed"], uri,
            None if val_parts is None else [storage.join(uri, u) for u in val_parts],
            d.get("val_part_rows"),
        )  # fmt: skip


# --------------------------------------------------------------------------- entry point


def list_parts(
    cfg: DataConfig,
    st: StorageConfig | None = None,
    source: str | None = None,
    uri: str | None = None,
    val_fraction: float | None = None,
    count: bool = True,
) -> PartsListing:
    """The listing of ``source`` (default ``cfg.source``) at ``uri``: read back when it is there
    for the same source, seed and split, else made (and written there). ``count``: also count
    tar members (a read of every tar's headers) when ``data.images_per_epoch`` is unset."""
    root = (source or cfg.source).rstrip("/")
    if not root:
        raise ValueError("data.source: no input URI given")
    uri = (uri or cfg.listing_uri or tempfile.mkdtemp(prefix="beit_listing_")).rstrip("/")
    index = storage.join(uri, INDEX)
    if storage.exists(index, st):
        old = PartsListing.from_json(storage.read_text(index, st), uri)
        if (old.root, old.seed, old.val_fraction) == (root, cfg.seed, val_fraction) and (
            cfg.layout in ("auto", old.layout)
        ):
            return _counted(old, cfg, st, count)
    if not storage.exists(root, st):
        raise FileNotFoundError(f"data.source: {root} does not exist")
    if cfg.manifest:
        listing = _list_manifest(cfg, st, root, uri, val_fraction)
    else:
        layout = _detect(root, cfg, st)
        if layout == "folders":
            listing = _list_folders(cfg, st, root, uri, val_fraction)
        else:
            listing = _list_files(cfg, st, root, layout, val_fraction)
    listing.uri = uri
    listing = _counted(listing, cfg, st, count)
    storage.write_text(index, listing.to_json(), st)
    return listing


def _counted(
    listing: PartsListing, cfg: DataConfig, st: StorageConfig | None, count: bool
) -> PartsListing:
    if listing.rows is not None or not count or cfg.images_per_epoch:
        return listing
    if listing.layout == "class_tars":
        return _index_class_tars(listing, st)
    fn = _parquet_rows if listing.layout == "parquet" else _wds_rows
    counts = run_tasks(fn, listing.units, {"st": st, "listing": listing, "cfg": cfg})
    listing.rows = [c[0] for c in counts]
    listing.val_rows = [c[1] for c in counts]
    return listing


# --------------------------------------------------------------------------- layout detection


def _detect(root: str, cfg: DataConfig, st: StorageConfig | None) -> str:
    """The layout (``data.layout``, or what ``auto`` finds) from one bounded look at the root:
    parquet files, tars (their first headers tell class tars from WebDataset), else folders."""
    if cfg.layout != "auto":
        return cfg.layout
    look = first_look(root, st)
    top = look.files
    if any(u.lower().endswith(".parquet") for u in top):
        return "parquet"
    tars = [u for u in top if u.lower().endswith(TAR_SUFFIXES)]
    if not tars and look.dirs and not any(u.lower().endswith(IMAGE_SUFFIXES) for u in top):
        # Nested shards (root/train/shard-0.tar): look one level down before calling it folders.
        sample = first_look(look.dirs[0], st, limit=64).files
        if any(s.lower().endswith(".parquet") for s in sample):
            return "parquet"
        tars = [s for s in sample if s.lower().endswith(TAR_SUFFIXES)]
    if tars:
        return containers.peek_layout(tars[0], st)
    return "folders"


# --------------------------------------------------------------------------- class folders


def _list_folders(
    cfg: DataConfig, st: StorageConfig | None, root: str, uri: str, val_fraction: float | None
) -> PartsListing:
    """Every image below the root, walked in parallel tasks (:func:`walk.walk`), each run of
    files shuffled into listing parts in its task."""
    args = dict(root=root, uri=uri, st=st, seed=cfg.seed, val_fraction=val_fraction)
    written = [w for _, w in walk(root, st, _range_parts, args)]
    return _from_parts(written, root, uri, cfg.seed, val_fraction)


def _from_parts(
    written: list[list[tuple[str, int, int, list[str]]]],
    root: str,
    uri: str,
    seed: int,
    val_fraction: float | None,
) -> PartsListing:
    """The listing of the parts the listing tasks wrote ((name, rows, val rows, classes) each)."""
    parts = sorted(p for chunk in written for p in chunk)
    if not parts:
        raise ValueError(f"data.source: no image files found under {root}")
    classes = sorted({c for *_, cls in parts for c in cls})
    return PartsListing(
        "folders", root, [storage.join(uri, name) for name, *_ in parts],
        rows=[r for _, r, _, _ in parts], val_rows=[v for _, _, v, _ in parts],
        classes=classes or None, val_fraction=val_fraction, seed=seed,
    )  # fmt: skip


def _range_parts(
    name: str,
    items: list[tuple[str, int]],
    root: str,
    uri: str,
    st: StorageConfig | None,
    seed: int,
    val_fraction: float | None,
) -> list[tuple[str, int, int, list[str]]]:
    """One run of the walk's files: its images, shuffled, as parts (in the walking task)."""
    args = (root, uri, st, seed, val_fraction)
    return _shuffled_parts(items, f"<listing-range-{name}>", f"r{name}", *args)


def _shuffled_parts(
    found: list[tuple[str, int]],
    label: str,
    tag: str,
    root: str,
    uri: str,
    st: StorageConfig | None,
    seed: int,
    val_fraction: float | None,
) -> list[tuple[str, int, int, list[str]]]:
    """The image files of ``found`` ((uri, size) pairs) shuffled by (seed, ``label``) and
    written as parts ``part-<tag>-<k>``: (part name, rows, val rows, classes) each."""
    keep = [(u, size) for u, size in found if u.lower().endswith(IMAGE_SUFFIXES)]
    if not keep:
        return []
    order = image_rng(seed, 0, label).permutation(len(keep))
    return _write_parts(
        [keep[i][0] for i in order], [keep[i][1] for i in order], root, uri, st, seed,
        val_fraction, tag,
    )  # fmt: skip


def _write_parts(
    paths: list[str],
    sizes: list[int],
    root: str,
    uri: str,
    st: StorageConfig | None,
    seed: int,
    val_fraction: float | None,
    tag: str,
) -> list[tuple[str, int, int, list[str]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    fs, _ = storage.pyarrow_fs(uri, st)
    storage.makedirs(uri, st)
    for j in range(0, len(paths), PART_ROWS):
        chunk = paths[j : j + PART_ROWS]
        keys = [relative_key(p, root) for p in chunk]
        classes = [k.split("/")[0] if "/" in k else "" for k in keys]
        name = f"part-{tag}-{j // PART_ROWS:05d}.parquet"
        table = pa.table(
            {"path": chunk, "key": keys, "class": classes, "size": sizes[j : j + PART_ROWS]}
        )
        path = storage.strip_scheme(storage.join(uri, name))
        # row groups of a read slice's size: a slice reads its rows, not the whole part
        storage.retry(
            pq.write_table, table, path, filesystem=fs, row_group_size=PART_GROUP_ROWS, what=path
        )
        val = sum(in_val_split(k, val_fraction, seed) for k in keys) if val_fraction else 0
        out.append((name, len(chunk), val, sorted({c for c in classes if c})))
    return out


def read_part(
    uri: str, st: StorageConfig | None = None, start: int = 0, stop: int | None = None
) -> dict[str, list[Any]]:
    """A listing part's rows ``[start, stop)`` (default all): {path, key, class, size} lists,
    reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri, st)

    def rows() -> dict[str, list[Any]]:
        pf = pq.ParquetFile(path, filesystem=fs)
        end = pf.metadata.num_rows if stop is None else min(stop, pf.metadata.num_rows)
        groups, first, at = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if at < end and at + n > start:
                groups.append(g)
                first = at if first is None else first
            at += n
        if not groups:
            return {c: [] for c in pf.schema_arrow.names}
        table = pf.read_row_groups(groups).slice(start - first, end - start)
        return table.to_pydict()

    return storage.retry(rows, what=uri)


# --------------------------------------------------------------------------- manifests


def _list_manifest(
    cfg: DataConfig, st: StorageConfig | None, root: str, uri: str, val_fraction: float | None
) -> PartsListing:
    """A manifest (parquet or CSV, ``path`` or ``key`` column; S3 Inventory's ``key``) as parts:
    one task per manifest file, each writing its rows shuffled."""
    fs, path = storage.filesystem(cfg.manifest, st)
    prefix = cfg.manifest.split("://", 1)[0] + "://" if storage.is_remote(cfg.manifest) else ""
    files = [prefix + p for p in (fs.find(path) if fs.isdir(path) else [path])]
    files = [f for f in files if f.lower().endswith((".parquet", ".csv", ".csv.gz"))]
    if not files:
        raise ValueError(f"data.manifest: no parquet or CSV files at {cfg.manifest}")
    tasks = list(enumerate(files))
    args = dict(root=root, uri=uri, st=st, seed=cfg.seed, val_fraction=val_fraction)
    return _from_parts(run_tasks(_manifest_task, tasks, args), root, uri, cfg.seed, val_fraction)


def _manifest_task(
    task: tuple[int, str],
    root: str,
    uri: str,
    st: StorageConfig | None,
    seed: int,
    val_fraction: float | None,
) -> list[tuple[str, int, int, list[str]]]:
    import pyarrow.parquet as pq

    k, file = task
    if file.lower().endswith(".parquet"):
        fs, path = storage.pyarrow_fs(file, st)
        cols = pq.read_table(path, filesystem=fs).to_pydict()
    else:
        text = storage.read_bytes(file, st)
        if file.lower().endswith(".gz"):
            import gzip

            text = gzip.decompress(text)
        rows = list(csv.reader(io.StringIO(text.decode("utf-8"))))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        if "path" in header or "key" in header:
            cols = {h: [r[i] for r in rows[1:]] for i, h in enumerate(header)}
        else:  # S3 Inventory CSV: no header, columns bucket, key, ...
            cols = {"key": [r[1] for r in rows]}
    names = cols.get("path") or cols.get("key")
    if names is None:
        raise ValueError(f"data.manifest: {file} has no 'path' or 'key' column")
    sizes = [int(s) for s in cols.get("size", [-1] * len(names))]
    paths = [p if "://" in p or p.startswith("/") else storage.join(root, p) for p in names]
    args = (root, uri, st, seed, val_fraction)
    return _shuffled_parts(
        list(zip(paths, sizes, strict=True)), f"<manifest-{k}>", f"m{k:04d}", *args
    )


# --------------------------------------------------------------------------- tars and parquet


def _list_files(
    cfg: DataConfig,
    st: StorageConfig | None,
    root: str,
    layout: str,
    val_fraction: float | None,
) -> PartsListing:
    """Tars or parquet files below the root, walked as every listing is (a source holds
    thousands of them, not millions: their URIs are the units)."""
    suffixes = (".parquet",) if layout == "parquet" else TAR_SUFFIXES
    files = [u for _, run in walk(root, st, _suffixed, {"suffixes": suffixes}) for u in run]
    if not files:
        raise ValueError(f"data.source: no {layout} inputs found under {root}")
    classes = (
        sorted({posixpath.basename(u).split(".")[0] for u in files})
        if layout == "class_tars"
        else None
    )
    return PartsListing(
        layout, root, files, classes=classes, val_fraction=val_fraction, seed=cfg.seed
    )


def _suffixed(name: str, items: list[tuple[str, int]], suffixes: tuple[str, ...]) -> list[str]:
    return [u for u, _ in items if u.lower().endswith(suffixes)]


def _parquet_rows(unit: str, st: StorageConfig | None, listing: PartsListing, cfg: DataConfig):  # noqa: ANN202
    """(rows, val rows) of a parquet file, from its footer."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(unit, st)
    n = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
    return n, n if listing.unit_split(unit) == "val" else 0


def _wds_rows(unit: str, st: StorageConfig | None, listing: PartsListing, cfg: DataConfig):  # noqa: ANN202
    """(samples, val samples) of a WebDataset shard, from its member headers (data is skipped:
    seeked over where the file allows it); the shard's split is the whole shard's."""
    n = sum(1 for _ in containers.samples("webdataset", containers.members(unit, st)))
    return n, n if listing.unit_split(unit) == "val" else 0


VAL_GROUP = 64
"""Class tars one counting task reads; it writes their validation members as one part."""


def _index_class_tars(listing: PartsListing, st: StorageConfig | None) -> PartsListing:
    """Count class tars from their headers, in tasks of ``VAL_GROUP`` tars; with a split each
    also writes the validation members' (tar, member, offset, size) as a part: evaluating then
    reads 5 % of the bytes, not every tar. Compressed tars (no member offsets) leave the index
    out."""
    n = len(listing.units)
    tasks = [
        (k, list(range(i, min(i + VAL_GROUP, n)))) for k, i in enumerate(range(0, n, VAL_GROUP))
    ]
    out = run_tasks(_tar_group_index, tasks, {"st": st, "listing": listing})
    listing.rows = [c[0] for counts, _ in out for c in counts]
    listing.val_rows = [c[1] for counts, _ in out for c in counts]
    written = [part for _, part in out]
    if listing.val_fraction and all(part is not None for part in written):
        kept = [(name, rows) for name, rows in written if rows]  # type: ignore[misc]
        listing.val_parts = [storage.join(listing.uri, name) for name, _ in kept]
        listing.val_part_rows = [rows for _, rows in kept]
    return listing


def _tar_group_index(
    task: tuple[int, list[int]], st: StorageConfig | None, listing: PartsListing
) -> tuple[list[tuple[int, int]], tuple[str, int] | None]:
    """(images, val images) per tar of the group, and the group's val part (name, rows), None
    when a tar has no member offsets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    k, idx = task
    counts, rows = [], {c: [] for c in ("path", "member", "offset", "size", "key", "class")}
    indexable = True
    for i in idx:
        unit = listing.units[i]
        indexable &= not containers.compressed(unit)
        stem = tar_stem(unit, listing.root)
        cls = posixpath.basename(stem)
        n = val = 0
        for s in containers.samples("class_tars", containers.members(unit, st)):
            n += 1
            key, m = f"{stem}/{s.key}", s.image
            if m is not None and in_val_split(key, listing.val_fraction or 0.0, listing.seed):
                val += 1
                for c, v in zip(rows, (unit, m.name, m.offset, m.size, key, cls), strict=True):
                    rows[c].append(v)
        counts.append((n, val))
    if not indexable:
        return counts, None
    name = f"val-{k:05d}.parquet"
    if rows["key"]:
        fs, _ = storage.pyarrow_fs(listing.uri, st)
        storage.makedirs(listing.uri, st)
        path = storage.strip_scheme(storage.join(listing.uri, name))
        pq.write_table(pa.table(rows), path, filesystem=fs)
    return counts, (name, len(rows["key"]))


def unit_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch reads its ``n`` units: a permutation fixed by (seed, epoch)."""
    return image_rng(seed, epoch, "<order>").permutation(n)
