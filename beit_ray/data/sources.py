"""Raw rows of a listed source's units, the four layouts, on local disk or s3://.

Layouts (``DataConfig.layout``; ``auto`` detects, in :mod:`beit_ray.data.listing`):

- ``folders``: ``root/<class>/<image>`` (ImageNet); label = index of <class> in the class index.
- ``class_tars``: ImageNet-22k's ``root/n01440764.tar`` of JPEGs; class = tar stem.
- ``webdataset``: tar shards of ``<key>.jpg`` + ``<key>.cls`` (int) or ``<key>.json``
  ({"label"|"cls": int}); other extensions ignored.
- ``parquet``: a bytes column (``image_column``) with optional ``label_column``/``key_column``.

Raw row schema (:data:`RAW_COLUMNS`): ``key`` str (stable across runs: path relative to the
root, ``<tar>/<member>``, or ``<file>#<row>``), ``path`` str (the file it came from),
``image`` bytes, ``label`` int64 (-1 when unlabelled), ``class_name`` str, ``error`` str
("" when fine; a bad input becomes a row with the reason, never an exception; a transient
storage failure that outlives its retries raises, so no row records it).

Bytes come from :mod:`beit_ray.data.containers`, the one reader of files, tars and parquet.

Class index: ``classes.json`` = {"classes": [name, ...]}; id = position. :func:`class_index`
reads ``data.classes_uri`` or ``<source>/classes.json`` when present, else writes the sorted
class names to ``data.classes_uri`` or the caller's ``write_to`` (jobs pass
``<output>/classes.json``), so every job maps class → id the same way.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterable, Iterator
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


# --------------------------------------------------------------------------- listing


def relative_key(uri: str, root: str) -> str:
    return posixpath.relpath(storage.strip_scheme(uri), storage.strip_scheme(root))


def class_index(
    listing: Any, cfg: DataConfig, st: StorageConfig | None = None, write_to: str | None = None
) -> list[str] | None:
    """The class names in id order (``listing``: a :class:`~beit_ray.data.listing.PartsListing`);
    read from the index file, or written there from the listing."""
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


INT_COLUMNS = ("label", "pos", "idx", "total")


def _rows(
    rows: list[dict[str, Any]], columns: tuple[str, ...] = RAW_COLUMNS
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for c in columns:
        vals = [r[c] for r in rows]
        out[c] = np.array(vals, dtype=np.int64 if c in INT_COLUMNS else object)
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


def chunked(
    rows: Iterable[dict[str, Any]], columns: tuple[str, ...] = RAW_COLUMNS
) -> Iterator[dict[str, np.ndarray]]:
    """Rows as column batches of FILES_PER_READ_TASK rows (a tar is never held whole)."""
    chunk: list[dict[str, Any]] = []
    for r in rows:
        chunk.append(r)
        if len(chunk) >= FILES_PER_READ_TASK:
            yield _rows(chunk, columns)
            chunk = []
    if chunk:
        yield _rows(chunk, columns)
