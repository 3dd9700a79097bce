"""List and read the four source layouts into raw rows, on local disk or s3://.

Layouts (``DataConfig.layout``; ``auto`` detects):

- ``folders``: ``root/<class>/<image>`` (ImageNet); label = index of <class> in the class index.
- ``class_tars``: ImageNet-22k's ``root/n01440764.tar`` of JPEGs; class = tar stem.
- ``webdataset``: tar shards of ``<key>.jpg`` + ``<key>.cls`` (int) or ``<key>.json``
  ({"label"|"cls": int}); other extensions ignored.
- ``parquet``: a bytes column (``image_column``) with optional ``label_column``/``key_column``.

Raw row schema (:data:`RAW_COLUMNS`): ``key`` str (stable across runs: path relative to the
root, ``<tar>/<member>``, or ``<file>#<row>``), ``path`` str (the file it came from),
``image`` bytes, ``label`` int64 (-1 when unlabelled), ``class_name`` str, ``error`` str
("" when fine; a read failure becomes a row with the reason, never an exception).

Class index: ``classes.json`` = {"classes": [name, ...]}; id = position. :func:`class_index`
reads ``data.classes_uri`` or ``<source>/classes.json`` when present, else writes the sorted
class names to ``data.classes_uri`` or the caller's ``write_to`` (jobs pass
``<output>/classes.json``), so every job maps class → id the same way.

Parallelism: class folders are listed concurrently (one listing per class prefix), and reading
is a Ray Data map over the input list cut into many blocks: one read task per tar or parquet
file, ~64 images per task for folders.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from beit_ray import storage
from beit_ray.config import StorageConfig
from beit_ray.data import containers
from beit_ray.data.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES, TAR_SUFFIXES = containers.IMAGE_SUFFIXES, containers.TAR_SUFFIXES
RAW_COLUMNS = ("key", "path", "image", "label", "class_name", "error")
FILES_PER_READ_TASK = 64


@dataclass
class Listing:
    """What a source holds: its layout, root and sorted input units (files or tars)."""

    layout: str
    root: str
    units: list[str]
    """Full URIs, sorted: image files (folders) or tar/parquet files."""
    classes: list[str] | None = None
    """Class names found (folders, class_tars), sorted."""
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- listing


def relative_key(uri: str, root: str) -> str:
    return posixpath.relpath(storage.strip_scheme(uri), storage.strip_scheme(root))


def _list_folders(root: str, st: StorageConfig | None) -> tuple[list[str], list[str]]:
    fs, path = storage.filesystem(root, st)
    prefix = root.split("://", 1)[0] + "://" if storage.is_remote(root) else ""
    entries = fs.ls(path, detail=True)
    dirs = sorted(e["name"] for e in entries if e["type"] == "directory")
    top = [prefix + e["name"] for e in entries if e["type"] != "directory"]

    def find(d: str) -> list[str]:
        return [prefix + p for p in fs.find(d)]

    # One listing per class prefix, concurrently: a bucket is not listed object by object.
    with ThreadPoolExecutor(max_workers=32) as pool:
        found = [u for chunk in pool.map(find, dirs) for u in chunk]
    files = sorted(u for u in top + found if u.lower().endswith(IMAGE_SUFFIXES))
    classes = sorted(
        {relative_key(u, root).split("/")[0] for u in files if "/" in relative_key(u, root)}
    )
    return files, classes


def detect_layout(uris: list[str], st: StorageConfig | None = None) -> str:
    """What ``auto`` means for these files: parquet, webdataset or class_tars (peeks at the
    first tar's member names: .cls/.json → webdataset), else folders."""
    if any(u.lower().endswith(".parquet") for u in uris):
        return "parquet"
    tars = [u for u in uris if u.lower().endswith(TAR_SUFFIXES)]
    if tars:
        return containers.peek_layout(tars[0], st)
    return "folders"


def list_source(
    cfg: DataConfig, st: StorageConfig | None = None, source: str | None = None
) -> Listing:
    """List ``source`` (default ``cfg.source``) and detect its layout when ``auto``, holding every
    input on the driver (materialized shards and tokenizer fitting plan with it). Training and
    labelling use :func:`beit_ray.data.listing.list_parts` instead, which keeps the listing in
    parquet."""
    from beit_ray.data.listing import _detect

    root = (source or cfg.source).rstrip("/")
    if not root:
        raise ValueError("data.source: no input URI given")
    if not storage.exists(root, st):
        raise FileNotFoundError(f"data.source: {root} does not exist")
    layout, _, _ = _detect(root, cfg, st)  # one listing of the top level decides the layout
    if layout == "folders":
        files, classes = _list_folders(root, st)
        return Listing("folders", root, files, classes or None)
    suffixes = (".parquet",) if layout == "parquet" else TAR_SUFFIXES
    units = storage.list_files(root, st, suffixes=suffixes)
    classes = (
        sorted({posixpath.basename(u).split(".")[0] for u in units})
        if layout == "class_tars"
        else None
    )
    return Listing(layout, root, units, classes)


def class_index(
    listing: Listing, cfg: DataConfig, st: StorageConfig | None = None, write_to: str | None = None
) -> list[str] | None:
    """The class names in id order; read from the index file, or written there from the listing."""
    if not listing.classes:
        return None
    candidates = (
        [cfg.classes_uri] if cfg.classes_uri else [storage.join(listing.root, "classes.json")]
    )
    for uri in candidates:
        if storage.exists(uri, st):
            classes = json.loads(storage.read_text(uri, st))["classes"]
            missing = sorted(set(listing.classes) - set(classes))
            if missing:
                raise ValueError(
                    f"{uri}: classes {missing[:5]} found in {listing.root} are not in the index"
                )
            return list(classes)
    target = cfg.classes_uri or write_to
    if target:
        storage.write_text(target, json.dumps({"classes": listing.classes}, indent=1), st)
        log.info("wrote class index (%d classes) to %s", len(listing.classes), target)
    return list(listing.classes)


# --------------------------------------------------------------------------- reading (in Ray tasks)


def _rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for c in RAW_COLUMNS:
        vals = [r[c] for r in rows]
        out[c] = np.array(vals, dtype=np.int64) if c == "label" else np.array(vals, dtype=object)
    return out


def _row(
    key: str, path: str, image: bytes = b"", label: int = -1, cls: str = "", error: str = ""
) -> dict[str, Any]:
    return {
        "key": key,
        "path": path,
        "image": image,
        "label": label,
        "class_name": cls,
        "error": error,
    }


def read_folder_files(
    paths: list[str], root: str, classes: dict[str, int], st: StorageConfig | None
) -> list[dict[str, Any]]:
    """Raw rows of image files (one GET each on an object store, fetched concurrently)."""
    rows = []
    for uri, data in zip(paths, containers.read_files(paths, st), strict=True):
        rel = relative_key(uri, root)
        cls = rel.split("/")[0] if "/" in rel else ""
        if isinstance(data, Exception):
            rows.append(_row(rel, uri, error=f"read_failed: {type(data).__name__}: {data}"))
        else:
            rows.append(_row(rel, uri, data, classes.get(cls, -1), cls))
    return rows


def tar_stem(uri: str, root: str) -> str:
    """A tar's key prefix: its path under the root without the .tar / .tgz suffix."""
    return relative_key(uri, root).split(".tar")[0].split(".tgz")[0]


def iter_tar(
    uri: str, root: str, layout: str, classes: dict[str, int], st: StorageConfig | None
) -> Iterator[dict[str, Any]]:
    """Rows of one tar, read once (the tar is never held whole in memory); a tar damaged part
    way gives the rows before the damage and an error row for itself."""
    stem = tar_stem(uri, root)
    cls = posixpath.basename(stem) if layout == "class_tars" else ""
    try:
        for s in containers.tar_samples(uri, layout, st):
            key = f"{stem}/{s.key}"
            if s.image is None:
                yield _row(key, uri, error=s.error)
            elif layout == "class_tars":
                yield _row(key, uri, s.image.data or b"", classes.get(cls, -1), cls)
            else:
                yield _row(key, uri, s.image.data or b"", s.label, s.class_name)
    except storage.TransientError:
        raise  # not the tar's fault: the read task fails and is retried, no row is lost
    except Exception as e:
        yield _row(f"{stem}/<tar>", uri, error=f"read_failed: {type(e).__name__}: {e}")


def iter_parquet(
    uri: str, root: str, cfg: DataConfig, st: StorageConfig | None
) -> Iterator[dict[str, Any]]:
    rel = relative_key(uri, root)
    extra = [c for c in (cfg.label_column, cfg.key_column) if c]
    try:
        for i, row in containers.parquet_images(uri, cfg.image_column, None, st, extra):
            img = row[cfg.image_column]
            key = str(row[cfg.key_column]) if cfg.key_column in row else f"{rel}#{i}"
            lab = row.get(cfg.label_column) if cfg.label_column else None
            if img is None:
                yield _row(key, uri, error="empty: null image")
            else:
                yield _row(key, uri, bytes(img), -1 if lab is None else int(lab))
    except storage.TransientError:
        raise
    except Exception as e:
        yield _row(f"{rel}#<file>", uri, error=f"read_failed: {type(e).__name__}: {e}")


def iter_unit(
    uri: str,
    root: str,
    layout: str,
    classes: dict[str, int],
    cfg: DataConfig,
    st: StorageConfig | None,
) -> Iterator[dict[str, Any]]:
    """Raw rows of one tar or parquet file, streamed."""
    if layout == "parquet":
        return iter_parquet(uri, root, cfg, st)
    return iter_tar(uri, root, layout, classes, st)


def read_units(
    batch: dict[str, np.ndarray],
    listing: Listing,
    cfg: DataConfig,
    st: StorageConfig | None,
    classes: list[str] | None,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch fn: a batch of input units (``path`` column) → raw rows, in chunks."""
    paths = [str(p) for p in batch["path"]]
    lay, root = listing.layout, listing.root
    ids = {c: i for i, c in enumerate(classes or [])}
    if lay == "folders":
        yield _rows(read_folder_files(paths, root, ids, st))
        return
    for uri in paths:
        yield from chunked(iter_unit(uri, root, lay, ids, cfg, st))


def chunked(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
    """Raw rows as column batches of FILES_PER_READ_TASK rows (a tar is never held whole)."""
    chunk: list[dict[str, Any]] = []
    for r in rows:
        chunk.append(r)
        if len(chunk) >= FILES_PER_READ_TASK:
            yield _rows(chunk)
            chunk = []
    if chunk:
        yield _rows(chunk)


def read_raw(
    listing: Listing,
    cfg: DataConfig,
    st: StorageConfig | None = None,
    classes: list[str] | None = None,
    units: list[str] | None = None,
):  # noqa: ANN201 - ray.data.Dataset (ray is imported lazily)
    """A Ray Dataset of raw rows (:data:`RAW_COLUMNS`) from ``units`` (default: all listed)."""
    import ray

    units = listing.units if units is None else units
    if not units:
        raise ValueError(f"data.source: no {listing.layout} inputs found under {listing.root}")
    per_task = FILES_PER_READ_TASK if listing.layout == "folders" else 1
    n_blocks = min(cfg.read_tasks or max(1, -(-len(units) // per_task)), len(units))
    ds = ray.data.from_items([{"path": u} for u in units], override_num_blocks=n_blocks)
    return ds.map_batches(
        read_units,
        fn_kwargs=dict(listing=listing, cfg=cfg, st=st, classes=classes),
        batch_size=per_task,
    )
