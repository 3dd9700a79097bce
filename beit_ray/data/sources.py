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
import tarfile
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from beit_ray import storage
from beit_ray.config import StorageConfig
from beit_ray.data.config import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif")
RAW_COLUMNS = ("key", "path", "image", "label", "class_name", "error")
FILES_PER_READ_TASK = 64
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


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


def _peek_tar(uri: str, st: StorageConfig | None, n: int = 8) -> list[str]:
    fs, path = storage.pyarrow_fs(uri, st)
    names = []
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            names.append(member.name)
            if len(names) >= n:
                break
    return names


def detect_layout(uris: list[str], st: StorageConfig | None = None) -> str:
    """What ``auto`` means for these files: parquet, webdataset or class_tars (peeks at the
    first tar's member names: .cls/.json → webdataset), else folders."""
    if any(u.lower().endswith(".parquet") for u in uris):
        return "parquet"
    tars = [u for u in uris if u.lower().endswith(TAR_SUFFIXES)]
    if tars:
        names = _peek_tar(tars[0], st)
        is_wds = any(n.lower().endswith((".cls", ".json")) for n in names)
        return "webdataset" if is_wds else "class_tars"
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
    rows = []
    fs, _ = storage.filesystem(root, st)
    remote = storage.is_remote(root)
    for uri in paths:
        rel = relative_key(uri, root)
        cls = rel.split("/")[0] if "/" in rel else ""
        try:
            if remote:  # one GET per object (pyarrow's input streams HEAD first)
                data = fs.cat_file(storage.strip_scheme(uri))
            else:
                with open(storage.strip_scheme(uri), "rb") as f:
                    data = f.read()
            rows.append(_row(rel, uri, data, classes.get(cls, -1), cls))
        except Exception as e:
            rows.append(_row(rel, uri, error=f"read_failed: {type(e).__name__}: {e}"))
    return rows


def iter_tar(
    uri: str, root: str, layout: str, classes: dict[str, int], st: StorageConfig | None
) -> Iterator[dict[str, Any]]:
    """Rows of one tar, streamed (the tar is never held whole in memory)."""
    fs, path = storage.pyarrow_fs(uri, st)
    rel = relative_key(uri, root)
    stem = rel.split(".tar")[0].split(".tgz")[0]
    cls = posixpath.basename(stem) if layout == "class_tars" else ""
    pending: dict[str, dict[str, Any]] = {}  # webdataset: members of one sample, grouped by key
    try:
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                name = m.name
                if layout == "class_tars":
                    if name.lower().endswith(IMAGE_SUFFIXES):
                        yield _row(f"{stem}/{name}", uri, data, classes.get(cls, -1), cls)
                    continue
                base = posixpath.basename(name)
                k, _, ext = base.partition(".")
                k = posixpath.join(posixpath.dirname(name), k)
                if pending and k not in pending:
                    yield from _wds_flush(pending, stem, uri)
                pending.setdefault(k, {})[ext.lower()] = data
    except Exception as e:
        yield from _wds_flush(pending, stem, uri)
        yield _row(f"{stem}/<tar>", uri, error=f"read_failed: {type(e).__name__}: {e}")
        return
    yield from _wds_flush(pending, stem, uri)


def _wds_flush(pending: dict[str, dict[str, Any]], stem: str, uri: str) -> Iterator[dict[str, Any]]:
    for k, parts in pending.items():
        img_ext = next((e for e in parts if ("." + e).endswith(IMAGE_SUFFIXES)), None)
        key = f"{stem}/{k}"
        if img_ext is None:
            yield _row(key, uri, error=f"no_image: sample has only {sorted(parts)}")
            continue
        label, cls = -1, ""
        try:
            if "cls" in parts:
                label = int(parts["cls"].decode().strip())
            elif "json" in parts:
                meta = json.loads(parts["json"])
                label = int(meta.get("label", meta.get("cls", -1)))
                cls = str(meta.get("class_name", meta.get("class", "")))
        except Exception as e:
            yield _row(key, uri, error=f"bad_label: {type(e).__name__}: {e}")
            continue
        yield _row(key, uri, parts[img_ext], label, cls)
    pending.clear()


def iter_parquet(
    uri: str, root: str, cfg: DataConfig, st: StorageConfig | None
) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri, st)
    rel = relative_key(uri, root)
    try:
        pf = pq.ParquetFile(path, filesystem=fs)
        names = set(pf.schema_arrow.names)
        if cfg.image_column not in names:
            yield _row(
                f"{rel}#<file>",
                uri,
                error=f"read_failed: no column {cfg.image_column!r} in {sorted(names)}",
            )
            return
        cols = [c for c in (cfg.image_column, cfg.label_column, cfg.key_column) if c and c in names]
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            d = batch.to_pydict()
            for i, img in enumerate(d[cfg.image_column]):
                key = str(d[cfg.key_column][i]) if cfg.key_column in d else f"{rel}#{row}"
                lab = d[cfg.label_column][i] if cfg.label_column in d else None
                if img is None:
                    yield _row(key, uri, error="empty: null image")
                else:
                    yield _row(key, uri, bytes(img), -1 if lab is None else int(lab))
                row += 1
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


# --------------------------------------------------------------------------- member access


def iter_tar_members(uri: str, st: StorageConfig | None = None) -> Iterator[str]:
    """Names of a tar's regular-file members in tar order, from its headers alone (on an object
    store that is still one streamed read of the whole tar: streams cannot seek)."""
    fs, path = storage.pyarrow_fs(uri, st)
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if m.isfile():
                yield m.name


def read_tar_members(
    uri: str, names: Collection[str], st: StorageConfig | None = None
) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the wanted members (first copy of a repeated name) in one streamed pass
    that stops after the last one is found."""
    wanted = set(names)
    if not wanted:
        return
    fs, path = storage.pyarrow_fs(uri, st)
    with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if m.isfile() and m.name in wanted:
                wanted.discard(m.name)
                yield m.name, tar.extractfile(m).read()  # type: ignore[union-attr]
                if not wanted:
                    return


def parquet_image_rows(uri: str, image_column: str, st: StorageConfig | None = None) -> int:
    """Row count of a parquet file of images, from its footer; raises when ``image_column`` is
    missing or not binary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri, st)
    pf = pq.ParquetFile(path, filesystem=fs)
    schema = pf.schema_arrow
    if image_column not in schema.names:
        raise ValueError(f"no column {image_column!r} in {schema.names}")
    kind = schema.field(image_column).type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise ValueError(f"column {image_column!r} is {kind}, not binary")
    return pf.metadata.num_rows


def read_parquet_rows(
    uri: str, image_column: str, rows: Collection[int], st: StorageConfig | None = None
) -> dict[int, bytes | None]:
    """Image bytes of the given row indices (None for null cells), reading only the row groups
    that hold them."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_fs(uri, st)
    pf = pq.ParquetFile(path, filesystem=fs)
    wanted, start = sorted(set(rows)), 0
    out: dict[int, bytes | None] = {}
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        here = [r for r in wanted if start <= r < start + n]
        if here:
            col = pf.read_row_group(g, columns=[image_column]).column(image_column)
            for r in here:
                out[r] = col[r - start].as_py()
        start += n
    return out
