"""Materialized mode: masked-patch rows written as parquet shards with a manifest, resumable.

Output layout (local or s3://)::

    <output>/manifest.json      plan + one entry per finished shard (files, rows, errors)
    <output>/classes.json       class index (folder / class-tar sources)
    <output>/data/wave-<id>/shard=<k>/*.parquet   rows of shard k
    <output>/data/wave-<id>/errors/*.jsonl        decode failures of that wave

Inputs (sorted) are cut into shards deterministically (``images_per_shard`` files, or
``tars_per_shard`` tars / parquet files). Shards are processed in waves, one Ray Data
execution each; a wave's files are committed by rewriting the manifest after the wave
succeeded. A rerun skips the manifest's shards and deletes uncommitted wave folders, so an
interruption never duplicates rows. The plan (a hash of the shard → inputs assignment) must
match the manifest's, or the run stops: write to a new output when the inputs changed. One
writer per output at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import uuid
from typing import Any

from beit_ray import storage
from beit_ray.config import StorageConfig, to_dict
from beit_ray.data.config import TokenizeConfig
from beit_ray.data.pipeline import _with_epoch, masked_rows, read_errors
from beit_ray.data.sources import Listing, class_index, list_source, read_raw

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def plan_shards(listing: Listing, images_per_shard: int, tars_per_shard: int) -> list[list[str]]:
    """Sorted inputs cut into consecutive shards (the same inputs always give the same plan)."""
    size = images_per_shard if listing.layout == "folders" else tars_per_shard
    units = sorted(listing.units)
    return [units[i : i + size] for i in range(0, len(units), size)]


def _plan_hash(plan: list[list[str]], root: str) -> str:
    h = hashlib.sha256()
    for k, units in enumerate(plan):
        for u in units:
            h.update(
                f"{k}\t{posixpath.relpath(storage.strip_scheme(u), storage.strip_scheme(root))}\n".encode()
            )
    return h.hexdigest()


def load_manifest(output: str, st: StorageConfig | None = None) -> dict[str, Any] | None:
    uri = storage.join(output, MANIFEST)
    return json.loads(storage.read_text(uri, st)) if storage.exists(uri, st) else None


def _save_manifest(output: str, manifest: dict[str, Any], st: StorageConfig | None) -> None:
    uri = storage.join(output, MANIFEST)
    text = json.dumps(manifest, indent=1)
    if storage.is_remote(output):
        storage.write_text(uri, text, st)  # an S3 PUT replaces the object atomically
        return
    import os

    tmp = storage.strip_scheme(uri) + f".tmp-{uuid.uuid4().hex}"
    storage.write_text(tmp, text)
    os.replace(tmp, storage.strip_scheme(uri))


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


def materialize(cfg: TokenizeConfig, progress: bool = True) -> dict[str, int]:
    """Write every unfinished shard; returns counts (read, written, failed, shards...)."""
    d, st, out = cfg.data, cfg.storage, cfg.output.rstrip("/")
    listing = list_source(d, st, cfg.input or d.source)
    if cfg.shards.limit:
        listing.units = sorted(listing.units)[: cfg.shards.limit]
    classes = class_index(listing, d, st, write_to=storage.join(out, "classes.json"))
    plan = plan_shards(listing, cfg.shards.images_per_shard, cfg.shards.tars_per_shard)
    phash = _plan_hash(plan, listing.root)
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
    step = cfg.shards.shards_per_wave
    for w in range(0, len(pending), step):
        wave = pending[w : w + step]
        wave_name = f"wave-{uuid.uuid4().hex[:12]}"
        wave_uri = storage.join(out, "data", wave_name)
        raw = None
        for k in wave:
            for e in range(cfg.shards.epochs):
                part = read_raw(listing, d, st, classes, plan[k])
                part = part.map_batches(_with_epoch, fn_kwargs={"epoch": e}, batch_size=None)
                part = part.map_batches(_with_shard, fn_kwargs={"shard": k}, batch_size=None)
                raw = part if raw is None else raw.union(part)
        errors_uri = storage.join(wave_uri, "errors")
        ds = masked_rows(raw, d, errors_uri, st)
        pfs, ppath = storage.pyarrow_fs(wave_uri, st)
        ds.write_parquet(ppath, filesystem=pfs, partition_cols=["shard"])
        files = _wave_files(wave_uri, st)
        errs: dict[int, int] = {}
        for r in read_errors(errors_uri, st):
            errs[r["shard"]] = errs.get(r["shard"], 0) + 1
        for k in wave:
            entries = files.get(k, [])
            rows = sum(n for _, n in entries)
            manifest["shards"][str(k)] = {
                "wave": wave_name,
                "files": [posixpath.join("data", wave_name, rel) for rel, _ in entries],
                "rows": rows,
                "errors": errs.get(k, 0),
                "inputs": len(plan[k]),
            }
            counts["written"] += rows
            counts["failed"] += errs.get(k, 0)
        counts["shards_written"] += len(wave)
        manifest["rows"] = sum(e["rows"] for e in manifest["shards"].values())
        manifest["errors"] = sum(e["errors"] for e in manifest["shards"].values())
        _save_manifest(out, manifest, st)  # the commit point of this wave
        log.info("committed %d shards (%s)", len(wave), wave_name)
    counts["read"] = counts["written"] + counts["failed"]
    return counts


def _with_shard(batch: dict[str, Any], shard: int) -> dict[str, Any]:
    import numpy as np

    batch["shard"] = np.full(len(batch["key"]), shard, dtype=np.int64)
    return batch


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
