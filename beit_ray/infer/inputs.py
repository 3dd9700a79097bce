"""What to label: the input's layout → a parquet listing → one :class:`Entry` per image.

Layouts (``LabelConfig.layout``) and the identity (output ``path``) of each image:
    files        every file below the input                      its URI
    manifest     the URIs in a .parquet/.csv                     the URI
    class_tars   every member of every tar (ImageNet-22k)        <tar uri>/<member>
    webdataset   the image of every <key>.* sample of every tar  <tar uri>/<key>.<ext>
    parquet      every row of every .parquet's image column      <parquet uri>#<row index>

Nothing here holds the input list in driver memory: :func:`list_inputs`, the one place that
lists, streams a sorted local walk into ``_LISTING.parquet`` (path, size), or lists an S3
prefix in parallel key-range tasks (:mod:`beit_ray.data.walk`) that write ``_LISTING/part-*``
in key order; later stages read the listing in batches. Local tars' members are listed from
their headers in one Ray task per tar (with each member's byte offset, so labelling reads each
member span once with ranged reads); object-store tars are not listed, but streamed once by
the task that labels them (:mod:`beit_ray.infer.tars`).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from beit_ray import storage as st
from beit_ray.config import ConfigError, StorageConfig
from beit_ray.data import containers
from beit_ray.data.walk import hidden, walk
from beit_ray.infer.config import LabelConfig
from beit_ray.storage import TransientError

MASKS_DIR, PLAN_NAME = "_masks", "_PLAN.json"
LISTING_DIR = "_LISTING"
CONTAINER_LAYOUTS = ("class_tars", "webdataset", "parquet")
LISTING_BATCH = 65_536  # rows per listing row group: bounded driver memory at any input size
LISTING_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64())])


class Entry(NamedTuple):
    """One input image: ``path`` names its output row; the rest says how to read it."""

    path: str
    kind: str = "file"
    """file (read ``path``), tar (member ``member`` of ``container``), parquet (row
    ``member`` of ``container``) or error (nothing to read; ``member`` is the reason)."""
    container: str = ""
    member: str = ""
    offset: int = -1
    """tar: where the member's data starts (-1: unknown, e.g. compressed tars)."""
    size: int = -1
    """Bytes of the file or member (-1: unknown)."""


@dataclass
class Units:
    """A layout's units (image URIs, or the tar/parquet files to open), as a parquet listing."""

    uri: str
    """Parquet with ``path`` (sorted) and ``size`` columns (or the folder of ``parts``)."""
    count: int
    kinds: dict[str, int] = field(default_factory=dict)
    """How many tar, parquet and image files the listing held (layout detection)."""
    parts: list[str] | None = None
    """The listing as parquet parts, in key order (an S3 prefix listed by key-range tasks)."""

    def batches(self, storage: StorageConfig | None) -> Iterator[pa.RecordBatch]:
        for uri in self.parts if self.parts is not None else [self.uri]:
            fs, path = st.pyarrow_fs(uri, storage)
            # a part at a time (at most walk.RUN_FILES rows), read whole: retried as one
            table = st.retry(pq.read_table, path, filesystem=fs, what=uri)
            yield from table.to_batches(max_chunksize=LISTING_BATCH)

    reused: bool = False
    """Read back as an earlier run saved it (nothing was listed)."""
    version: int = 0
    """Listing version: 0 for a first run's, one more for each ``--relist``."""
    root: str = ""
    """What was listed."""

    def paths(self, storage: StorageConfig | None = None) -> list[str]:
        """Every unit as a list (small inputs and tests only)."""
        return [p for b in self.batches(storage) for p in b.column("path").to_pylist()]


# --------------------------------------------------------------------------- listing


class ListingWriter:
    """Streams (path, size) rows into a parquet file in row groups of ``LISTING_BATCH``."""

    def __init__(self, uri: str, storage: StorageConfig | None) -> None:
        self.uri, self.count, self._buf = uri, 0, ([], [])  # type: ignore[var-annotated]
        fs, path = st.pyarrow_fs(uri, storage)
        if not st.is_remote(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self._writer = pq.ParquetWriter(path, LISTING_SCHEMA, filesystem=fs)

    def add(self, path: str, size: int) -> None:
        self._buf[0].append(path)
        self._buf[1].append(size)
        self.count += 1
        if len(self._buf[0]) >= LISTING_BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._buf[0]:
            table = pa.table(list(self._buf), schema=LISTING_SCHEMA)
            self._writer.write_table(table, row_group_size=LISTING_BATCH)
            self._buf = ([], [])

    def close(self) -> None:
        self._flush()
        self._writer.close()


def input_root(cfg: LabelConfig, uri: str | None = None) -> str:
    """``cfg.input`` (or ``uri``) as listed paths start: local paths absolute, no trailing /."""
    uri = cfg.input if uri is None else uri
    return (uri if st.is_remote(uri) else st.strip_scheme(uri)).rstrip("/")


def _kind(uri: str) -> str:
    if containers.is_tar(uri):
        return "tar"
    if uri.lower().endswith(".parquet"):
        return "parquet"
    return "image" if containers.is_image(uri) else ""


def _is_input(uri: str, root: str, out_root: str) -> bool:
    """Hidden files (.DS_Store, _SUCCESS) are not inputs; nor are our own outputs."""
    return not (hidden(uri, root) or uri.startswith(out_root))


def list_inputs(cfg: LabelConfig) -> Units:
    """Every file below ``cfg.input`` except hidden ones and our own outputs, as a sorted parquet
    listing under the output (``_LISTING/v<k>/part-*.parquet``, in path order), walked as every
    job lists (:func:`beit_ray.data.walk.walk`: key ranges on S3, runs of top-level folders
    locally) by Ray tasks when this driver is connected, else threads: listing waits on
    requests, and a no-op rerun should not start a cluster to find it has no work. The listing
    a first run saved is reused unless ``relist``, which walks again into a new version."""
    root = input_root(cfg)
    current = load_listing(cfg)
    if current is not None and current.root == root and not cfg.relist:
        return current
    version = 0 if current is None else current.version + 1
    folder = listing_folder(cfg, version)
    st.makedirs(folder, cfg.storage)  # a local output folder (object stores have none)
    out_root = input_root(cfg, cfg.output) + "/"
    args = {"folder": folder, "root": root, "out_root": out_root, "storage": cfg.storage}
    written = walk(root, cfg.storage, _write_range, args)
    kinds = {"tar": 0, "parquet": 0, "image": 0}
    parts, count = [], 0
    for _, (uri, n, part_kinds) in written:
        if n:
            parts.append(uri)
            count += n
        for k, v in part_kinds.items():
            kinds[k] += v
    return save_listing(cfg, Units(folder, count, kinds, parts, version=version, root=root))


def listing_folder(cfg: LabelConfig, version: int) -> str:
    return st.join(cfg.output, LISTING_DIR, f"v{version:04d}")


def save_listing(cfg: LabelConfig, units: Units) -> Units:
    """Record a listing version (its index, then the pointer to it: a listing is whole or
    absent)."""
    record = {
        "version": units.version, "root": units.root, "count": units.count,
        "kinds": units.kinds, "parts": [posixpath.basename(u) for u in units.parts or []],
    }  # fmt: skip
    st.write_text(st.join(units.uri, "_index.json"), json.dumps(record), cfg.storage)
    current = st.join(cfg.output, LISTING_DIR, "_current.json")
    st.write_text(current, json.dumps({"version": units.version}), cfg.storage)
    return units


def load_listing(cfg: LabelConfig, version: int | None = None) -> Units | None:
    """Listing ``version`` (default: the latest) as saved, or None."""
    if version is None:
        current = st.join(cfg.output, LISTING_DIR, "_current.json")
        if not st.exists(current, cfg.storage):
            return None
        version = int(json.loads(st.read_text(current, cfg.storage))["version"])
    folder = listing_folder(cfg, version)
    index = st.join(folder, "_index.json")
    if not st.exists(index, cfg.storage):
        return None
    d = json.loads(st.read_text(index, cfg.storage))
    parts = [st.join(folder, name) for name in d["parts"]]
    return Units(folder, d["count"], d["kinds"], parts, True, d["version"], d["root"])


def _write_range(
    name: str,
    items: list[tuple[str, int]],
    folder: str,
    root: str,
    out_root: str,
    storage: StorageConfig | None,
) -> tuple[str, int, dict[str, int]]:
    """One key range's inputs as a listing part (in the range task): (uri, rows, kinds)."""
    keep = [(u, s) for u, s in items if _is_input(u, root, out_root)]
    kinds: dict[str, int] = {"tar": 0, "parquet": 0, "image": 0}
    for u, _ in keep:
        kind = _kind(u)
        if kind:
            kinds[kind] += 1
    uri = st.join(folder, f"part-{name}.parquet")
    if keep:  # a part is written whole or not at all: a rerun lists again and overwrites it
        table = pa.table([[u for u, _ in keep], [s for _, s in keep]], schema=LISTING_SCHEMA)
        fs, path = st.pyarrow_fs(uri, storage)
        pq.write_table(table, path, filesystem=fs, row_group_size=LISTING_BATCH)
    return uri, len(keep), kinds


def subset(
    units: Units, suffixes: tuple[str, ...], uri: str, storage: StorageConfig | None
) -> Units:
    """The listing's files with these suffixes, as a listing at ``uri``."""
    writer = ListingWriter(uri, storage)
    for batch in units.batches(storage):
        for p, s in zip(
            batch.column("path").to_pylist(), batch.column("size").to_pylist(), strict=True
        ):
            if p.lower().endswith(suffixes):
                writer.add(p, s)
    writer.close()
    return Units(writer.uri, writer.count, version=units.version)


def _single(cfg: LabelConfig, uris: list[str]) -> Units:
    """One input file as a listing (a version, as a walked one)."""
    current = load_listing(cfg)
    version = 0 if current is None else current.version + 1
    folder = listing_folder(cfg, version)
    writer = ListingWriter(st.join(folder, "part-00000.parquet"), cfg.storage)
    for u in uris:
        writer.add(u, -1)
    writer.close()
    units = Units(folder, writer.count, {}, [writer.uri], version=version, root=cfg.input)
    return save_listing(cfg, units)


def resolve_layout(cfg: LabelConfig, layout: str | None = None) -> tuple[str, Units]:
    """The input's layout (``layout`` or ``cfg.layout``, ``auto`` resolved) and its listing:
    every file below it (a folder), or the URIs of a manifest, or the one file given."""
    from beit_ray.data.containers import TAR_SUFFIXES

    layout, lower = layout or cfg.layout, cfg.input.lower()
    if not st.exists(cfg.input, cfg.storage):
        raise ConfigError(f"input: {cfg.input} does not exist")
    if not _is_dir(cfg.input, cfg.storage):  # one file
        if layout == "auto":
            if lower.endswith(".csv"):
                layout = "manifest"
            elif lower.endswith(".parquet"):
                layout = "parquet" if _holds_images(cfg) else "manifest"
            elif lower.endswith(TAR_SUFFIXES):
                layout = _tar_layout(cfg, cfg.input)
            else:
                layout = "files"
        if layout == "manifest":
            return layout, read_manifest(cfg)
        return layout, _single(cfg, [cfg.input])
    if layout == "manifest":
        raise ConfigError(f"layout: manifest needs a .parquet/.csv file; {cfg.input} is a folder")
    listing = list_inputs(cfg)
    kinds = listing.kinds
    if layout == "auto":
        present = [k for k, v in kinds.items() if v]
        if len(present) > 1:  # picking one kind would silently drop the others
            found = ", ".join(f"{kinds[k]} {k} files" for k in present)
            raise ConfigError(
                f"layout: {cfg.input} mixes {found}; pass --layout files, class_tars, "
                "webdataset or parquet (the other kinds are then not inputs)"
            )
        if kinds["parquet"]:
            layout = "parquet"
        elif kinds["tar"]:
            first = _first(listing, cfg, TAR_SUFFIXES)
            layout = _tar_layout(cfg, first)
        else:
            layout = "files"
    return layout, listing


def _first(units: Units, cfg: LabelConfig, suffixes: tuple[str, ...]) -> str:
    for batch in units.batches(cfg.storage):
        for p in batch.column("path").to_pylist():
            if p.lower().endswith(suffixes):
                return p
    raise ConfigError(f"input: no {suffixes} file under {cfg.input}")


def _tar_layout(cfg: LabelConfig, first: str) -> str:
    """class_tars or webdataset, from the first tar's headers (a rerun keeps its plan's)."""
    return containers.peek_layout(first, cfg.storage)


def _holds_images(cfg: LabelConfig) -> bool:
    try:
        containers.parquet_rows(cfg.input, cfg.image_column, cfg.storage)
        return True
    except ValueError:
        return False


def _is_dir(uri: str, storage: StorageConfig | None) -> bool:
    fs, path = st.filesystem(uri, storage)
    return fs.isdir(path)


def read_manifest(cfg: LabelConfig) -> Units:
    """Image URIs from a parquet/CSV manifest (deduplicated and sorted in Arrow, not as Python
    strings); relative entries are relative to its folder."""
    import pyarrow.compute as pc

    uri, column = cfg.input, cfg.manifest_column
    fs, path = st.pyarrow_fs(uri, cfg.storage)
    if uri.lower().endswith(".csv"):
        import pyarrow.csv as pacsv

        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(f)
    else:
        table = pq.read_table(path, filesystem=fs)
    name = column if column in table.column_names else "path"
    if name not in table.column_names:
        raise ConfigError(
            f"manifest_column: {uri} has no column {column!r} (columns: {table.column_names})"
        )
    col = pc.utf8_trim_whitespace(pc.cast(table.column(name), pa.string()))
    col = pc.drop_null(col)
    col = col.filter(pc.not_equal(col, ""))
    base = uri.rsplit("/", 1)[0]
    relative = pc.invert(
        pc.or_(
            pc.match_substring_regex(col, r"^[a-zA-Z][a-zA-Z0-9+.-]+://"), pc.starts_with(col, "/")
        )
    )
    joined = pc.binary_join_element_wise(base.rstrip("/"), col, "/")
    col = pc.unique(pc.if_else(relative, joined, col))
    col = col.take(pc.sort_indices(col))
    del table
    current = load_listing(cfg)
    version = 0 if current is None else current.version + 1
    folder = listing_folder(cfg, version)
    uri = st.join(folder, "part-00000.parquet")
    fs, path = st.pyarrow_fs(uri, cfg.storage)
    if not st.is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    sizes = pa.array([-1] * len(col), pa.int64())
    table = pa.table([col, sizes], schema=LISTING_SCHEMA)  # Arrow strings, never Python ones
    pq.write_table(table, path, filesystem=fs, row_group_size=LISTING_BATCH)
    units = Units(folder, len(col), {}, [uri], version=version, root=cfg.input)
    return save_listing(cfg, units)


# --------------------------------------------------------------------------- containers


def member_path(container: str, name: str) -> str:
    """A tar member's identity: ``<tar uri>/<member name>`` (``./`` prefixes dropped)."""
    return f"{container}/{posixpath.normpath(name).lstrip('/')}"


def mask_uri(output: str, root: str, uri: str) -> str:
    """Where a segment mask goes: the input's path under the input root, plus ``.png``."""
    import hashlib

    if uri.startswith(root.rstrip("/") + "/"):
        rel = uri[len(root.rstrip("/")) + 1 :]
    else:  # manifest entries from anywhere: a stable, collision-free name
        rel = hashlib.sha1(uri.encode()).hexdigest()[:16] + "-" + os.path.basename(uri)
    return st.join(output, MASKS_DIR, rel.replace("#", "-row") + ".png")  # '#' reads as a fragment


# --------------------------------------------------------------------------- reading (in tasks)


def fetch(
    entries: list[Entry], storage: StorageConfig | None, image_column: str
) -> tuple[list[bytes | None], list[str]]:
    """The bytes of a chunk's images ("" error when fine). Files: one GET each; tar members:
    one ranged read per run of consecutive members of a tar; parquet rows: the row groups
    holding them."""
    n = len(entries)
    blobs: list[bytes | None] = [None] * n
    errors = [""] * n
    files = [i for i, e in enumerate(entries) if e.kind == "file"]
    found = containers.read_files([entries[i].path for i in files], storage)
    for i, data in zip(files, found, strict=True):
        if isinstance(data, Exception):
            errors[i] = f"read_failed: {type(data).__name__}: {data}"[:500]
        else:
            blobs[i] = data
    groups: list[list[int]] = []  # runs of consecutive members of one container
    for i, e in enumerate(entries):
        if e.kind == "error":
            errors[i] = e.member
        elif e.kind in ("tar", "parquet"):
            last = groups[-1] if groups else None
            if last and entries[last[-1]].container == e.container and last[-1] == i - 1:
                last.append(i)
            else:
                groups.append([i])
    for g in groups:
        first = entries[g[0]]
        got: dict[str, bytes | None] = {}
        failure = f"not found in {first.container}"
        try:
            if first.kind == "parquet":
                rows = [int(entries[i].member) for i in g]
                cells = containers.parquet_images(first.container, image_column, rows, storage)
                got = {str(r): row[image_column] for r, row in cells}
            elif all(entries[i].offset >= 0 for i in g):
                start = min(entries[i].offset for i in g)
                end = max(entries[i].offset + entries[i].size for i in g)
                span = containers.read_span(first.container, start, end, storage)
                for i in g:
                    e = entries[i]
                    data = span[e.offset - start : e.offset - start + e.size]
                    if len(data) == e.size:
                        got[e.member] = data
                failure = "truncated: the member runs past the end of the tar"
            else:  # compressed tars cannot seek: one streamed pass that stops at the last one
                names = [entries[i].member for i in g]
                got = dict(containers.read_members(first.container, names, storage))
        except TransientError:
            raise  # not the inputs' fault: no error row, the task is retried
        except Exception as e:  # a damaged container keeps the members read before the damage
            failure = f"{type(e).__name__}: {e}"
        for i in g:
            m = entries[i].member
            if m not in got:
                errors[i] = f"read_failed: {failure}"[:500]
            elif got[m] is None:
                errors[i] = "empty: null image"
            else:
                blobs[i] = got[m]
    return blobs, errors
