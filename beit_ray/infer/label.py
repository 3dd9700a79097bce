"""The labelling graph: list → read + decode + preprocess → predict (actor pool) → parquet.

Inputs (``LabelConfig.layout``): loose files (path = the file's URI), a .parquet/.csv manifest
of URIs, or the data pipeline's containers: per-class tars and WebDataset shards (one input per
image member, path = ``<tar uri>/<member>``) and parquet files of image bytes (one input per row,
path = ``<parquet uri>#<row index>``). Tar members are listed from their headers in one Ray task
per tar (parquet row counts come from footers): no image is read on the driver.

Resumable and exact: the input list (containers sorted, members in their own order) is cut into
fixed chunks; each chunk becomes one ``part-NNNNN.parquet`` written atomically (temp + rename
locally; an S3 PUT is atomic), and a rerun of the same command skips chunks whose file exists.
A read task opens a tar or parquet file once per chunk and extracts just that chunk's members.
Every input gives exactly one row; unreadable, corrupt, non-image and oversized files or members
give a row whose ``error`` says why; a tar that cannot be listed (to its end) gives one more row
whose path is the tar's URI; a parquet file without a binary image column gives one row.

Output under ``--output``:
    part-NNNNN.parquet   path, error, height, width + the task's columns (see ``task_schema``)
    _masks/...png        segment: class ids at the original size (``mask_uri`` points here)
    _PLAN.json           what the chunks were made of (a rerun must match it)
    _INPUTS.parquet      container layouts: the listed members, so a rerun need not list again
    _SUMMARY.json        counts, error reasons, images/s, checkpoint
Names starting with ``_`` keep ``pandas.read_parquet(output)`` / pyarrow datasets reading
only the parts.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from beit_ray import storage as st
from beit_ray.config import ConfigError, StorageConfig, to_dict
from beit_ray.infer.config import LabelConfig
from beit_ray.infer.inputs import (
    Entry,
    check_plan,
    fetch,
    mask_uri,
    plan_chunks,
    plan_entries,
    resolve_layout,
)
from beit_ray.runtime import print0

PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
SUMMARY_NAME = "_SUMMARY.json"


class LabelInterrupted(RuntimeError):
    """Raised by the ``stop_after_chunks`` hook: a stand-in for a crash, used by tests."""


def part_name(chunk: int) -> str:
    return f"part-{chunk:05d}.parquet"


def done_chunks(output: str, storage: StorageConfig | None) -> set[int]:
    """Chunk ids whose part file exists (complete by construction: written atomically)."""
    fs, path = st.filesystem(output, storage)
    if not fs.exists(path):
        return set()
    names = [os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return {int(m.group(1)) for n in names if (m := PART_RE.match(n))}


# --------------------------------------------------------------------------- schemas


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


# --------------------------------------------------------------------------- stages


def decode_batch(
    blobs: list[bytes | None], errors: list[str], preprocessor: Any, max_pixels: int
) -> dict[str, np.ndarray]:
    """Decode robustly and resize to the model's input (uint8); failures become error text."""
    from beit_ray.data.decode import DecodeError, decode_image

    n = len(blobs)
    h_out, w_out = preprocessor.output_size(1, 1)
    pixels = np.zeros((n, 3, h_out, w_out), dtype=np.uint8)  # [B, 3, h, w]; zeros on error rows
    errors, heights, widths = list(errors), np.zeros(n, np.int32), np.zeros(n, np.int32)
    for i, data in enumerate(blobs):
        if errors[i]:
            continue
        try:
            image = decode_image(data or b"", max_pixels=max_pixels)
            heights[i], widths[i] = image.shape[:2]
            pixels[i] = preprocessor.to_uint8(image)
        except DecodeError as e:
            errors[i] = str(e)[:500]
        except Exception as e:  # never let one file end the job
            errors[i] = f"corrupt: {type(e).__name__}: {e}"[:500]
    return {
        "error": np.array(errors, dtype=object),
        "height": heights,
        "width": widths,
        "pixels": pixels,
    }


def read_decode(
    batch: dict[str, np.ndarray],
    *,
    preprocessor: Any,
    max_pixels: int,
    storage: StorageConfig | None,
    image_column: str,
    batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: read units (JSON) → decoded rows, ``batch_size`` at a time."""
    for chunk, text in zip(batch["chunk"], batch["unit"], strict=True):
        unit = json.loads(str(text))
        blobs, errors = fetch(unit, storage, image_column)
        for s in range(0, len(blobs), batch_size):
            part = slice(s, s + batch_size)
            out = decode_batch(blobs[part], errors[part], preprocessor, max_pixels)
            yield {
                "path": np.array(unit["paths"][part], dtype=object),
                "chunk": np.full(len(out["error"]), int(chunk), dtype=np.int64),
                "mask_uri": np.array(unit["masks"][part], dtype=object),
                **out,
            }


def read_units(
    plan: list[list[Entry]], pending: list[int], cfg: LabelConfig
) -> list[dict[str, Any]]:
    """The read tasks of the pending chunks: one per (chunk, tar/parquet file), so a container
    is opened once per chunk; loose files and error entries go ``batch_size`` at a time."""
    root, bs = cfg.input.rstrip("/"), cfg.predict.batch_size
    units = []
    for c in pending:
        groups: list[list[Entry]] = []
        for e in plan[c]:
            last = groups[-1] if groups else None
            same = last is not None and (last[0].kind, last[0].container) == (e.kind, e.container)
            if same and (e.kind in ("tar", "parquet") or len(last) < bs):  # type: ignore[arg-type]
                last.append(e)  # type: ignore[union-attr]
            else:
                groups.append([e])
        for g in groups:
            unit = {
                "kind": g[0].kind,
                "container": g[0].container,
                "paths": [e.path for e in g],
                "members": [e.member for e in g],
                "masks": [
                    mask_uri(cfg.output, root, e.path) if cfg.task == "segment" else "" for e in g
                ],
            }
            units.append({"chunk": c, "unit": json.dumps(unit)})
    return units


class PredictorActor:
    """Ray Data actor: holds one :class:`Predictor`; writes segment masks itself."""

    def __init__(
        self,
        checkpoint: str,
        task: str,
        storage: StorageConfig | None,
        top_k: int,
        embed_pool: str,
        threads: int | None,
        num_gpus: float,
        dtype: str = "float32",
    ) -> None:
        from beit_ray.infer.predictor import Predictor, actor_threads

        if threads is None:
            import ray

            threads = actor_threads(ray.get_runtime_context().get_assigned_resources().get("CPU"))
        device = "cuda" if num_gpus > 0 else "cpu"
        self.task, self.storage = task, storage
        self.predictor = Predictor(
            checkpoint,
            task,
            storage,
            top_k=top_k,
            embed_pool=embed_pool,
            device=device,
            threads=threads,
            dtype=dtype,  # type: ignore[arg-type]
        )  # type: ignore[arg-type]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["path"])
        errors: list[str | None] = [str(e) if e else None for e in batch["error"]]
        ok = [i for i in range(n) if errors[i] is None]
        results: dict[int, dict[str, Any]] = {}
        if ok:
            sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in ok]
            for i, res in zip(ok, self.predictor.forward(batch["pixels"][ok], sizes), strict=True):
                results[i] = res
        cols: dict[str, list[Any]] = defaultdict(list)
        for i in range(n):
            res = results.get(i)
            if self.task == "segment" and res is not None:
                try:
                    st.write_bytes(str(batch["mask_uri"][i]), png_bytes(res["mask"]), self.storage)
                except Exception as e:
                    errors[i], res = f"write_failed: {type(e).__name__}: {e}"[:500], None
            cols["path"].append(str(batch["path"][i]))
            cols["error"].append(errors[i])
            cols["height"].append(int(batch["height"][i]) or None)
            cols["width"].append(int(batch["width"][i]) or None)
            cols["chunk"].append(int(batch["chunk"][i]))
            if self.task == "classify":
                cols["top_ids"].append(None if res is None else res["top_ids"].tolist())
                cols["top_labels"].append(None if res is None else res["top_labels"])
                cols["top_scores"].append(None if res is None else res["top_scores"].tolist())
            elif self.task == "embed":
                cols["embedding"].append(None if res is None else res["embedding"].tolist())
            else:
                cols["mask_uri"].append(None if res is None else str(batch["mask_uri"][i]))
                cols["class_ids"].append(None if res is None else res["class_ids"].tolist())
                cols["pixel_counts"].append(None if res is None else res["pixel_counts"].tolist())
        schema = task_schema(self.task).append(pa.field("chunk", pa.int64()))
        return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)


def png_bytes(mask: np.ndarray) -> bytes:
    """A class-id map as a lossless PNG (8-bit, or 16-bit beyond 256 classes)."""
    from PIL import Image

    image = Image.fromarray(mask.astype(np.uint16) if mask.dtype != np.uint8 else mask)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------- writing


def write_part(table: pa.Table, output: str, chunk: int, storage: StorageConfig | None) -> None:
    """Write one chunk's rows atomically: a reader never sees a half-written part."""
    table = table.drop_columns(["chunk"]).sort_by("path")
    fs, root = st.pyarrow_fs(output, storage)
    final = f"{root.rstrip('/')}/{part_name(chunk)}"
    if st.is_remote(output):  # one PUT / a completed multipart upload: atomic
        pq.write_table(table, final, filesystem=fs)
        return
    os.makedirs(root, exist_ok=True)
    tmp = f"{root.rstrip('/')}/.{part_name(chunk)}.tmp-{uuid.uuid4().hex[:8]}"
    pq.write_table(table, tmp, filesystem=fs)
    os.replace(tmp, final)


def read_parts(
    output: str, storage: StorageConfig | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Every part file under ``output`` as one table."""
    fs, root = st.pyarrow_fs(output, storage)
    chunks = sorted(done_chunks(output, storage))
    paths = [f"{root.rstrip('/')}/{part_name(c)}" for c in chunks]
    if not paths:
        return pa.table({})
    return pa.concat_tables([pq.read_table(p, filesystem=fs, columns=columns) for p in paths])


# --------------------------------------------------------------------------- the job


def check_checkpoint(cfg: LabelConfig) -> Any:
    """The checkpoint's preprocessor, after checking it can do ``cfg.task`` (reads JSON only)."""
    from beit_ray.models.load import model_dir
    from beit_ray.models.preprocess import Preprocessor

    folder = model_dir(cfg.checkpoint, cfg.storage)
    arch = (
        json.loads(st.read_text(st.join(folder, "config.json"), cfg.storage)).get("architectures")
        or []
    )
    need = {"classify": "ImageClassification", "segment": "SemanticSegmentation"}.get(cfg.task)
    if need and not any(need in a for a in arch):
        raise ConfigError(
            f"checkpoint: {cfg.checkpoint} is a {arch or 'bare encoder'} checkpoint; --task {cfg.task} needs a *For{need} one"
        )
    preprocessor = Preprocessor.from_pretrained(folder, cfg.storage)
    if "height" not in preprocessor.size and not preprocessor.do_center_crop:
        raise ConfigError(
            f"checkpoint: {folder}'s preprocessor gives images of varying sizes (size {preprocessor.size}, no crop); batching needs a fixed size"
        )
    return preprocessor


def label(cfg: LabelConfig, *, stop_after_chunks: int | None = None) -> dict[str, Any]:
    """Label every input not yet written; returns (and writes) the summary.

    ``stop_after_chunks`` raises :class:`LabelInterrupted` after writing that many chunks (a
    crash stand-in for tests); rerunning finishes the rest.
    """
    import ray

    from beit_ray.runtime import init_ray

    cfg.require()
    start = time.perf_counter()
    preprocessor = check_checkpoint(cfg)  # before any cluster work
    layout, units = resolve_layout(cfg)
    if not units:
        raise ConfigError(f"input: no {layout} inputs found under {cfg.input}")
    entries = plan_entries(cfg, layout, units)
    inputs = [e.path for e in entries]
    if not inputs:
        raise ConfigError(f"input: no images inside the {len(units)} {layout} files")
    plan = plan_chunks(entries, cfg.chunk_size)
    check_plan(cfg, layout, units, entries, len(plan))
    done = done_chunks(cfg.output, cfg.storage)
    pending = [c for c in range(len(plan)) if c not in done]
    print0(
        f"label: {len(inputs)} images ({layout}, {len(units)} files) in {len(plan)} chunks; "
        f"{len(plan) - len(pending)} already written"
    )

    processed, run_seconds, timing = 0, 0.0, {}
    if pending:
        init_ray(cfg.ray, cfg.storage)
        run_start = time.perf_counter()  # images/s counts the pipeline, not Ray's start-up
        items = read_units(plan, pending, cfg)
        bs = cfg.predict.batch_size
        ds = ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
        ds = ds.map_batches(
            read_decode,
            fn_kwargs={
                "preprocessor": preprocessor,
                "max_pixels": cfg.predict.max_pixels,
                "storage": cfg.storage,
                "image_column": cfg.image_column,
                "batch_size": bs,
            },
            batch_size=1,
            num_cpus=cfg.actors.decode_cpus,
        )
        a = cfg.actors
        ds = ds.map_batches(
            PredictorActor,
            fn_constructor_kwargs={
                "checkpoint": cfg.checkpoint,
                "task": cfg.task,
                "storage": cfg.storage,
                "top_k": cfg.predict.top_k,
                "embed_pool": cfg.predict.embed_pool,
                "threads": a.threads,
                "num_gpus": a.num_gpus,
                "dtype": cfg.predict.dtype,
            },
            compute=ray.data.ActorPoolStrategy(min_size=a.min_actors, max_size=a.max_actors),
            batch_size=bs,
            num_cpus=a.num_cpus,
            num_gpus=a.num_gpus,
            batch_format="numpy",
        )
        processed, timing = _collect(
            ds, cfg, {c: len(plan[c]) for c in pending}, stop_after_chunks, run_start
        )
        run_seconds = time.perf_counter() - run_start
    summary = _summarize(cfg, inputs, processed, run_seconds, resumed=len(plan) - len(pending))
    summary.update(timing)
    summary["seconds_total"] = round(time.perf_counter() - start, 3)
    st.write_text(st.join(cfg.output, SUMMARY_NAME), json.dumps(summary, indent=1), cfg.storage)
    print0(
        f"label: {summary['ok']}/{summary['files']} labelled, {summary['errors']} errors; "
        f"{processed} this run at {summary['images_per_s']:.1f} images/s → {cfg.output}"
    )
    return summary


def _collect(
    ds: Any,
    cfg: LabelConfig,
    expected: dict[int, int],
    stop_after: int | None,
    start: float,
) -> tuple[int, dict[str, float | None]]:
    """Stream results; write each chunk as soon as all its rows have arrived. Returns the rows
    written and the timing: seconds to the first result (actor start-up: model load) and the
    steady images/s after it (what a long run converges to; None when all rows came at once)."""
    buffers: dict[int, list[pa.Table]] = defaultdict(list)
    counts: Counter[int] = Counter()
    written = processed = arrived = first_rows = 0
    first = last = 0.0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        last = time.perf_counter()
        if not arrived:
            first, first_rows = last, batch.num_rows
        arrived += batch.num_rows
        chunk_col = batch.column("chunk").to_numpy()
        for c in np.unique(chunk_col):
            c = int(c)
            part = batch.filter(pa.array(chunk_col == c))
            buffers[c].append(part)
            counts[c] += part.num_rows
            if counts[c] == expected[c]:
                write_part(pa.concat_tables(buffers.pop(c)), cfg.output, c, cfg.storage)
                written += 1
                processed += expected[c]
                if stop_after is not None and written >= stop_after:
                    raise LabelInterrupted(f"stopped after {written} chunks (stop_after_chunks)")
    if buffers:  # a row went missing: never write a partial chunk
        raise RuntimeError(f"chunks {sorted(buffers)} are incomplete; rerun to finish them")
    # undefined (None) when every row came in the first batch
    steady = (
        (arrived - first_rows) / (last - first) if last > first and arrived > first_rows else None
    )
    return processed, {
        "seconds_to_first_result": round(first - start, 3) if arrived else 0.0,
        "images_per_s_after_first": None if steady is None else round(steady, 3),
    }


def _summarize(
    cfg: LabelConfig, inputs: list[str], processed: int, seconds: float, resumed: int
) -> dict[str, Any]:
    """Counts over every part file, checked against the input list (nothing lost or duplicated)."""
    table = read_parts(cfg.output, cfg.storage, columns=["path", "error"])
    paths = table.column("path").to_pylist() if table.num_rows else []
    errors = [e for e in (table.column("error").to_pylist() if table.num_rows else []) if e]
    if len(paths) != len(set(paths)) or set(paths) != set(inputs):
        missing, extra = len(set(inputs) - set(paths)), len(set(paths) - set(inputs))
        raise RuntimeError(
            f"output does not match the input list: {missing} missing, {extra} unexpected, {len(paths) - len(set(paths))} duplicated"
        )
    reasons = Counter(e.split(":", 1)[0] for e in errors)
    return {
        "input": cfg.input,
        "output": cfg.output,
        "checkpoint": cfg.checkpoint,
        "task": cfg.task,
        "layout": cfg.layout,
        "files": len(inputs),
        "ok": len(paths) - len(errors),
        "errors": len(errors),
        "error_reasons": dict(reasons.most_common()),
        "chunks": -(-len(inputs) // cfg.chunk_size),
        "chunks_resumed": resumed,
        "processed_this_run": processed,
        "seconds": round(seconds, 3),
        "images_per_s": round(processed / seconds, 3) if seconds > 0 else 0.0,
        "config": to_dict(cfg, redact=True),
    }
