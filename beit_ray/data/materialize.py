"""Materialized mode: masked-patch rows written as parquet shards with a manifest, resumable.

Output layout (local or s3://)::

    <output>/manifest.json      plan + the shards committed up to ``compacted_through``
    <output>/manifest.d/commit-<n>.json   one appended commit per wave (its shards' entries)
    <output>/classes.json       class index (folder / class-tar sources)
    <output>/data/wave-<id>/shard=<k>/*.parquet   rows of shard k
    <output>/data/wave-<id>/errors/*.jsonl        decode failures of that wave

The source is listed once, as every job lists it (:func:`~beit_ray.data.listing.list_parts`,
into ``<output>/_listing``, read back by a rerun), and its units are cut into shards
deterministically: slices of ``images_per_shard`` files of the listing parts, or
``tars_per_shard`` tars / parquet files. A shard is a read group of (unit, start, count)
slices, read by :func:`~beit_ray.data.plan.read_group` like a training epoch's. Shards are
processed in waves, one Ray Data execution each over all of the wave's shards (hundreds of tars
read by one graph, each row tagged with its shard), so waves can be large. A wave commits by appending one small file
under ``manifest.d/`` (its size is the wave's, not the run's); ``manifest.json`` is rewritten
once per run to fold the commits in (:func:`load_manifest` merges commits newer than its
``compacted_through``). A rerun skips committed shards and deletes uncommitted wave folders,
so an interruption never duplicates rows. The plan (a hash of the shard → inputs assignment) must
match the manifest's, or the run stops: write to a new output when the inputs changed. One
writer per output at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
import re
import uuid
from typing import Any

import numpy as np

from beit_ray import storage
from beit_ray.config import StorageConfig, to_dict
from beit_ray.data.config import TokenizeConfig
from beit_ray.data.errors import read_errors
from beit_ray.data.listing import PartsListing, list_parts
from beit_ray.data.pipeline import masked_rows
from beit_ray.data.plan import READ_CPUS, read_group
from beit_ray.data.sources import chunked, class_index, relative_key

log = logging.getLogger(__name__)
MANIFEST, COMMITS = "manifest.json", "manifest.d"
COMMIT_RE = re.compile(r"commit-(\d+)\.json$")


Slice = tuple[int, int, int]  # (unit, start, count): count -1 is the whole unit


def plan_shards(
    listing: PartsListing, images_per_shard: int, tars_per_shard: int
) -> list[list[Slice]]:
    """The listing's units cut into shards, each a read group (the same listing always gives
    the same plan): slices of ``images_per_shard`` files of each listing part, or
    ``tars_per_shard`` whole tars / parquet files."""
    if listing.parts:
        return [
            [(i, s, min(images_per_shard, n - s))]
            for i, n in enumerate(listing.rows or [])
            for s in range(0, n, images_per_shard)
        ]
    n = len(listing.units)
    return [
        [(i, 0, -1) for i in range(j, min(j + tars_per_shard, n))]
        for j in range(0, n, tars_per_shard)
    ]


def _plan_hash(plan: list[list[Slice]], listing: PartsListing) -> str:
    h = hashlib.sha256()
    base = listing.uri if listing.parts else listing.root
    for k, group in enumerate(plan):
        for unit, start, count in group:
            h.update(f"{k}\t{relative_key(listing.units[unit], base)}\t{start}\t{count}\n".encode())
    return h.hexdigest()


def _first(listing: PartsListing, limit: int | None) -> PartsListing:
    """The listing's first ``limit`` units (for trials)."""
    if not limit or limit >= len(listing.units):
        return listing
    cut = lambda xs: None if xs is None else xs[:limit]  # noqa: E731
    return dataclasses.replace(
        listing, units=listing.units[:limit], rows=cut(listing.rows), val_rows=cut(listing.val_rows)
    )


def _commits(output: str, st: StorageConfig | None) -> list[tuple[int, str]]:
    """(sequence number, uri) of the appended wave commits, in order."""
    fs, path = storage.filesystem(storage.join(output, COMMITS), st)
    if not fs.exists(path):
        return []
    found = [(int(m.group(1)), p) for p in fs.ls(path, detail=False) if (m := COMMIT_RE.search(p))]
    prefix = output.split("://", 1)[0] + "://" if storage.is_remote(output) else ""
    return sorted((n, prefix + p) for n, p in found)


def load_manifest(output: str, st: StorageConfig | None = None) -> dict[str, Any] | None:
    """``manifest.json`` with the wave commits appended after it folded in."""
    uri = storage.join(output, MANIFEST)
    if not storage.exists(uri, st):
        return None
    manifest = json.loads(storage.read_text(uri, st))
    for n, commit in _commits(output, st):
        if n > manifest.get("compacted_through", -1):
            manifest["shards"].update(json.loads(storage.read_text(commit, st))["shards"])
            manifest["compacted_through"] = n
    _totals(manifest)
    return manifest


def _totals(manifest: dict[str, Any]) -> None:
    manifest["rows"] = sum(e["rows"] for e in manifest["shards"].values())
    manifest["errors"] = sum(e["errors"] for e in manifest["shards"].values())


def _save_manifest(output: str, manifest: dict[str, Any], st: StorageConfig | None) -> None:
    _put(storage.join(output, MANIFEST), json.dumps(manifest, indent=1), st)


def _put(uri: str, text: str, st: StorageConfig | None) -> None:
    """Write atomically: an S3 PUT replaces the object at once; locally temp + rename."""
    if storage.is_remote(uri):
        storage.write_text(uri, text, st)
        return
    import os

    tmp = storage.strip_scheme(uri) + f".tmp-{uuid.uuid4().hex}"
    storage.write_text(tmp, text)
    os.replace(tmp, storage.strip_scheme(uri))


def _append_commit(
    output: str, manifest: dict[str, Any], shards: dict[str, Any], st: StorageConfig | None
) -> None:
    """Commit a wave: one new file holding only its shards (the manifest is not rewritten)."""
    n = manifest.get("compacted_through", -1) + 1
    _put(storage.join(output, COMMITS, f"commit-{n:08d}.json"), json.dumps({"shards": shards}), st)
    manifest["shards"].update(shards)
    manifest["compacted_through"] = n
    _totals(manifest)


def _compact(output: str, manifest: dict[str, Any], st: StorageConfig | None) -> None:
    """Fold the commits into manifest.json (once per run), then drop the folded commit files."""
    _save_manifest(output, manifest, st)
    folded = [u for n, u in _commits(output, st) if n <= manifest.get("compacted_through", -1)]
    if folded:
        fs, _ = storage.filesystem(output, st)
        fs.rm([storage.strip_scheme(u) for u in folded])


def _schema(cfg: TokenizeConfig) -> dict[str, Any]:
    d, n = cfg.data, cfg.data.grid**2
    cols: dict[str, Any] = {
        "pixel_values": {"dtype": "uint8", "shape": [3, d.image_size, d.image_size]},
        "bool_masked_pos": {"dtype": "bool", "shape": [n]},
        "key": {"dtype": "string"},
    }
    if d.tokenizer == "none":
        cols["tokenizer_pixels"] = {
            "dtype": "uint8",
            "shape": [3, d.tokenizer_image_size, d.tokenizer_image_size],
        }
    else:
        cols["visual_token_ids"] = {"dtype": "int16", "shape": [n]}
    return cols


def _clean_orphans(output: str, manifest: dict[str, Any], st: StorageConfig | None) -> None:
    fs, path = storage.filesystem(storage.join(output, "data"), st)
    if not fs.exists(path):
        return
    committed = {e["wave"] for e in manifest["shards"].values()}
    for entry in fs.ls(path, detail=False):
        name = posixpath.basename(entry.rstrip("/"))
        if name.startswith("wave-") and name not in committed:
            log.warning("removing uncommitted %s from an interrupted run", name)
            fs.rm(entry, recursive=True)


def _wave_files(wave_uri: str, st: StorageConfig | None) -> dict[int, list[tuple[str, int]]]:
    import pyarrow.parquet as pq

    out: dict[int, list[tuple[str, int]]] = {}
    if not storage.exists(wave_uri, st):
        return {}
    pfs, _ = storage.pyarrow_fs(wave_uri, st)
    for uri in storage.list_files(wave_uri, st, suffixes=(".parquet",)):
        rel = relpath(uri, wave_uri)
        shard = int(rel.split("/")[0].split("=")[1])
        rows = pq.read_metadata(storage.strip_scheme(uri), filesystem=pfs).num_rows
        out.setdefault(shard, []).append((rel, rows))
    return out


def relpath(uri: str, base: str) -> str:
    return posixpath.relpath(storage.strip_scheme(uri), storage.strip_scheme(base))


def check_outputs(cfg: TokenizeConfig) -> None:
    """On a multi-node cluster the shards, commits and error logs go to shared storage: tasks on
    every node write there. Joins Ray only when the job joins a cluster."""
    from beit_ray.runtime import check_job_outputs

    check_job_outputs({"output": cfg.output}, cfg.ray, cfg.storage)


def materialize(cfg: TokenizeConfig, progress: bool = True) -> dict[str, int]:
    """Write every unfinished shard; returns counts (read, written, failed, shards...)."""
    d, st, out = cfg.data, cfg.storage, cfg.output.rstrip("/")
    check_outputs(cfg)
    source = cfg.input or d.source
    # tars are not counted (that would read them): a shard of tars is its tars
    listing = list_parts(d, st, source, uri=storage.join(out, "_listing"), count=False)
    listing = _first(listing, cfg.shards.limit)
    classes = class_index(listing, d, st, write_to=storage.join(out, "classes.json"))
    plan = plan_shards(listing, cfg.shards.images_per_shard, cfg.shards.tars_per_shard)
    phash = _plan_hash(plan, listing)
    manifest = load_manifest(out, st)
    if manifest is None:
        manifest = {
            "format": "beit-ray masked-patch shards v1",
            "source": listing.root,
            "layout": listing.layout,
            "num_shards": len(plan),
            "plan_hash": phash,
            "epochs": cfg.shards.epochs,
            "columns": _schema(cfg),
            "data": to_dict(d),
            "shards": {},
        }
    elif manifest["plan_hash"] != phash or manifest.get("epochs") != cfg.shards.epochs:
        raise ValueError(
            f"{out}: the inputs or shard plan changed since the first run; write to a new --output"
        )
    storage.makedirs(out, st)
    _clean_orphans(out, manifest, st)
    done_before = len(manifest["shards"])
    pending = [k for k in range(len(plan)) if str(k) not in manifest["shards"]]
    counts = {
        "shards_total": len(plan),
        "shards_skipped": done_before,
        "shards_written": 0,
        "read": 0,
        "written": 0,
        "failed": 0,
    }
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = progress
    if not storage.exists(storage.join(out, MANIFEST), st):
        _save_manifest(out, manifest, st)  # the plan first: commits append to it
    step = cfg.shards.shards_per_wave
    for w in range(0, len(pending), step):
        wave = pending[w : w + step]
        wave_name = f"wave-{uuid.uuid4().hex[:12]}"
        wave_uri = storage.join(out, "data", wave_name)
        # One graph over the whole wave: a task per (shard, epoch), rows tagged with both.
        items = [{"shard": k, "epoch": e} for e in range(cfg.shards.epochs) for k in wave]
        raw = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_shards,
            fn_kwargs=dict(
                listing=listing, cfg=d, st=st, classes=classes, groups={k: plan[k] for k in wave}
            ),
            batch_size=1,
            num_cpus=READ_CPUS,
            **storage.TASK_RETRIES,
        )
        errors_uri = storage.join(wave_uri, "errors")
        ds = masked_rows(raw, d, errors_uri, st)
        pfs, ppath = storage.pyarrow_fs(wave_uri, st)
        ds.write_parquet(ppath, filesystem=pfs, partition_cols=["shard"])
        files = _wave_files(wave_uri, st)
        errs: dict[int, int] = {}
        for r in read_errors(errors_uri, st):
            errs[r["shard"]] = errs.get(r["shard"], 0) + 1
        committed = {}
        for k in wave:
            entries = files.get(k, [])
            rows = sum(n for _, n in entries)
            committed[str(k)] = {
                "wave": wave_name,
                "files": [posixpath.join("data", wave_name, rel) for rel, _ in entries],
                "rows": rows,
                "errors": errs.get(k, 0),
                "inputs": sum(n if n >= 0 else 1 for _, _, n in plan[k]),  # files, or tars
            }
            counts["written"] += rows
            counts["failed"] += errs.get(k, 0)
        counts["shards_written"] += len(wave)
        _append_commit(out, manifest, committed, st)  # the commit point of this wave
        log.info("committed %d shards (%s)", len(wave), wave_name)
    _compact(out, manifest, st)
    counts["read"] = counts["written"] + counts["failed"]
    return counts


def read_shards(
    batch: dict[str, Any],
    listing: PartsListing,
    cfg: Any,
    st: StorageConfig | None,
    classes: list[str] | None,
    groups: dict[int, list[Slice]],
):  # noqa: ANN201 - generator of raw-row blocks
    """Ray Data fn: (shard, epoch) → the shard's raw rows, + ``epoch`` and ``shard``."""
    ids = {c: i for i, c in enumerate(classes or [])}
    for shard, epoch in zip(batch["shard"], batch["epoch"], strict=True):
        for block in chunked(read_group(groups[int(shard)], listing, cfg, st, ids)):
            n = len(block["key"])
            block["epoch"] = np.full(n, int(epoch), dtype=np.int64)
            block["shard"] = np.full(n, int(shard), dtype=np.int64)
            yield block


def read_materialized(uri: str, storage_cfg: StorageConfig | None = None):  # noqa: ANN201 - ray.data.Dataset
    """The committed rows of a materialized output (only shards listed in its manifest)."""
    import ray

    manifest = load_manifest(uri, storage_cfg)
    if manifest is None:
        raise FileNotFoundError(f"{uri}: no {MANIFEST}; run jobs/tokenize_shards.py first")
    files = [
        storage.join(uri, f)
        for e in sorted(manifest["shards"].items(), key=lambda kv: int(kv[0]))
        for f in e[1]["files"]
    ]
    if not files:
        raise ValueError(f"{uri}: the manifest lists no rows yet")
    fs, _ = storage.pyarrow_fs(uri, storage_cfg)
    return ray.data.read_parquet(
        [storage.strip_scheme(f) for f in files], filesystem=fs, partitioning=None
    )
