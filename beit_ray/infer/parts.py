"""A labelling output's parts: one parquet file per chunk, written atomically, counts in its
footer; their names, their schema per task, and reading them back."""

from __future__ import annotations

import json
import os
import posixpath
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from beit_ray import storage as st
from beit_ray.infer.plan import PART_META_KEY, part_counts
from beit_ray.storage import StorageConfig

PARTS_DIR = "parts"
PARTS_PER_FOLDER = 10_000
"""Chunks a folder of parts holds: no prefix lists hundreds of thousands of files (100 M inputs
in chunks of 256 are 39 folders of 10,000; streamed tars: one folder per 10,000 chunks of a
tar's ids, i.e. a folder a tar)."""
PART_RE = re.compile(r"^part-(\d{10})\.parquet$")


def part_name(chunk: int) -> str:
    """Chunk ``chunk``'s part, relative to the output."""
    return f"{PARTS_DIR}/{chunk // PARTS_PER_FOLDER:06d}/part-{chunk:010d}.parquet"


def done_chunks(output: str, storage: StorageConfig | None) -> set[int]:
    """Chunk ids whose part file exists (complete by construction: written atomically); one
    recursive listing of ``parts/`` (1,000 names a request on S3)."""
    fs, path = st.filesystem(st.join(output, PARTS_DIR), storage)
    if not st.retry(fs.exists, path, what=output):
        return set()
    names = (posixpath.basename(p) for p in st.retry(fs.find, path, what=output))
    return {int(m.group(1)) for n in names if (m := PART_RE.match(n))}


def task_schema(task: str) -> pa.Schema:
    """Columns of a part file for ``task`` (the internal ``chunk`` column is dropped on write)."""
    common = [
        pa.field("path", pa.string()),
        pa.field("error", pa.string()),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
    ]
    extra = {
        "classify": [
            pa.field("top_ids", pa.list_(pa.int64())),
            pa.field("top_labels", pa.list_(pa.string())),
            pa.field("top_scores", pa.list_(pa.float32())),
        ],
        "embed": [pa.field("embedding", pa.list_(pa.float32()))],
        "segment": [
            pa.field("mask_uri", pa.string()),
            pa.field("class_ids", pa.list_(pa.int64())),
            pa.field("pixel_counts", pa.list_(pa.int64())),
        ],
    }[task]
    return pa.schema(common + extra)


def write_part(
    table: pa.Table, output: str, chunk: int, storage: StorageConfig | None
) -> dict[str, Any]:
    """Write one chunk's rows atomically (a reader never sees a half-written part), its counts
    in the footer; returns the counts."""
    table = table.drop_columns(["chunk"]).sort_by("path")
    counts = part_counts(table)
    table = table.replace_schema_metadata({PART_META_KEY: json.dumps(counts)})
    fs, root = st.pyarrow_fs(output, storage)
    final = f"{root.rstrip('/')}/{part_name(chunk)}"
    if st.is_remote(output):  # one PUT / a completed multipart upload: atomic
        st.retry(pq.write_table, table, final, filesystem=fs, what=final)
        return counts
    folder, name = final.rsplit("/", 1)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp, filesystem=fs)
    os.replace(tmp, final)
    return counts


def read_part(
    uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    """One part file (or any of the output's parquet files), retried on transient errors."""
    fs, path = st.pyarrow_fs(uri, storage)
    return st.retry(pq.read_table, path, filesystem=fs, columns=columns, what=uri)


def read_parts(
    output: str, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Every part file under ``output`` as one table."""
    chunks = sorted(done_chunks(output, storage))
    if not chunks:
        return pa.table({})
    return pa.concat_tables(
        [read_part(st.join(output, part_name(c)), storage, columns) for c in chunks]
    )
