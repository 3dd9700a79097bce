"""The labelling graph: plan (parquet) → per chunk: read + decode → predict + write (actors).

Inputs (``LabelConfig.layout``): loose files (path = the file's URI), a .parquet/.csv manifest
of URIs, or the data pipeline's containers: per-class tars and WebDataset shards (one input per
image member, path = ``<tar uri>/<member>``) and parquet files of image bytes (one input per row,
path = ``<parquet uri>#<row index>``). See :mod:`beit_ray.infer.inputs`.

Scales out: the input list lives in parquet (``_INPUTS/part-*.parquet``, one row per chunk), never in
driver memory. Each chunk is one Ray Data row: a read task fetches its images (one GET per
object; a local tar's members by their listed offsets, one ranged read per run of members; a
tar or parquet file on an object store is streamed once by one read task, which cuts it into
chunks as its inputs arrive, since listing it first would read it twice and a chunk would read
a whole row group) and decodes them; a predictor
actor labels them and writes the chunk's ``parts/<k>/part-<chunk>.parquet`` itself (atomically: temp +
rename locally; an S3 PUT is atomic), returning only its counts. The driver appends those counts to the ledger
(:mod:`beit_ray.infer.plan`), so a rerun checks coverage from a listing of the output and the
ledger, without reading any part.

Resumable and exact: the input list (sorted; container members in their own order) is cut into
fixed chunks (an object-store tar: its own chunks, numbered ``tar index × 100,000 + k``), and a
rerun of the same command writes only chunks whose part is missing. Every input gives exactly
one row; unreadable, corrupt, non-image and oversized files or members give a row whose
``error`` says why; a tar that cannot be read to its end gives one more row whose path is the
tar's URI; a parquet file without a binary image column gives one row.

Output under ``--output``:
    parts/<k>/part-<chunk>.parquet   path, error, height, width + the task's columns (see
                         ``task_schema``), sorted by path; footer key ``beit_ray.part``: its
                         rows/errors/reasons; 10,000 chunks a folder (``parts.PARTS_PER_FOLDER``)
    _masks/...png        segment: class ids at the original size (``mask_uri`` points here)
    _PLAN.json           what the chunks were made of, in generations (a rerun reuses it)
    _LISTING/v<k>/       the listing each generation was planned from (``--relist``: one more)
    _INPUTS[-g]/         the chunks' inputs of generation g (containers: their members)
    _TARS/tar-<t>-<n>    object-store tars: tar t was read to its end and holds n inputs
    _PARTS/              the ledger of written parts (chunk, rows, errors, reasons)
    _SUMMARY.json        counts, error reasons, images/s, checkpoint
    _PREVIEW.html        a page to open in a browser: errors by kind, the label histogram and
                         a sample of 64 images with their labels or mask overlays
Names starting with ``_`` keep ``pandas.read_parquet(output)`` / pyarrow datasets reading
only the parts.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from beit_ray import storage as st
from beit_ray.config import ConfigError, StorageConfig, to_dict
from beit_ray.infer.config import LabelConfig, resolve_dtype
from beit_ray.infer.inputs import input_root, mask_uri, resolve_layout
from beit_ray.infer.parts import (  # noqa: F401 - part_name, read_parts re-exported
    PART_RE,
    done_chunks,
    part_name,
    read_parts,
    task_schema,
    write_part,
)
from beit_ray.infer.plan import (
    Ledger,
    Plan,
    build_plan,
    coverage,
    incomplete,
    old_layout,
    pending_work,
    read_units,
    saved_plan,
    tar_marks,
)
from beit_ray.runtime import print0

SUMMARY_NAME = "_SUMMARY.json"


class LabelInterrupted(RuntimeError):
    """Raised by the ``stop_after_chunks`` hook: a stand-in for a crash, used by tests."""


# --------------------------------------------------------------------------- stages


def decode_batch(
    blobs: list[bytes | None], errors: list[str], preprocessor: Any, max_pixels: int
) -> dict[str, Any]:
    """Decode robustly and resize to the model's input (uint8); failures become error text.

    ``pixels`` is a list of uint8 [3, h, w]: one size for a fixed-size preprocessor, each
    image's own for a keep-ratio one (segmentation at the training scale); zeros on error rows.
    """
    from beit_ray.data.decode import DecodeError, decode_image

    n = len(blobs)
    blank = np.zeros((3, *preprocessor.output_size(1, 1)), dtype=np.uint8)
    pixels = [blank] * n
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
    plan: Plan,
    preprocessor: Any,
    max_pixels: int,
    storage: StorageConfig | None,
    image_column: str,
    output: str,
    root: str,
    masks: bool,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: work items (chunk ids, or whole object-store tars) → one row per chunk
    holding its decoded images and their paths (a chunk never splits across blocks, so one
    actor sees all of it)."""
    for chunk, entries, blobs, errors in read_units(batch, plan, storage, image_column, output):
        out = decode_batch(blobs, errors, preprocessor, max_pixels)
        meta = {
            "path": [e.path for e in entries],
            "mask_uri": [mask_uri(output, root, e.path) if masks else "" for e in entries],
            "error": [str(x) for x in out["error"]],
            "height": out["height"].tolist(),
            "width": out["width"].tolist(),
            "shapes": [list(p.shape) for p in out["pixels"]],
        }
        # One flat buffer: a row holds one tensor, and keep-ratio images differ in shape.
        flat = np.concatenate([p.ravel() for p in out["pixels"]])  # [sum of 3·h·w]
        yield {
            "chunk": np.array([int(chunk)], dtype=np.int64),
            "meta": np.array([json.dumps(meta)], dtype=object),
            "pixels": flat[None],  # [1, total]
        }


def unflatten(flat: np.ndarray, shapes: list[list[int]]) -> list[np.ndarray]:
    """:func:`read_decode`'s flat buffer → its images, uint8 [3, h, w] views."""
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


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
        dtype: str = "auto",
        output: str | None = None,
        batch_size: int = 16,
        fail_at_chunk: int | None = None,
    ) -> None:
        from beit_ray.infer.predictor import Predictor, actor_threads

        if threads is None:
            import ray

            threads = actor_threads(ray.get_runtime_context().get_assigned_resources().get("CPU"))
        device = "cuda" if num_gpus > 0 else "cpu"
        dtype = resolve_dtype(dtype, device)  # predict.dtype auto: bfloat16 on a GPU actor
        self.task, self.storage, self.output, self.batch_size = task, storage, output, batch_size
        self.fail_at_chunk = fail_at_chunk
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Chunk rows (from :func:`read_decode`) → each chunk's part written → its counts."""
        out: dict[str, list[Any]] = defaultdict(list)
        for chunk, text, flat in zip(batch["chunk"], batch["meta"], batch["pixels"], strict=True):
            meta = json.loads(str(text))
            pixels = unflatten(np.asarray(flat, dtype=np.uint8), meta["shapes"])
            n, bs = len(meta["path"]), self.batch_size
            tables = [
                self.rows(
                    {
                        "path": np.array(meta["path"][s : s + bs], dtype=object),
                        "mask_uri": np.array(meta["mask_uri"][s : s + bs], dtype=object),
                        "error": np.array(meta["error"][s : s + bs], dtype=object),
                        "height": np.array(meta["height"][s : s + bs], np.int32),
                        "width": np.array(meta["width"][s : s + bs], np.int32),
                        "pixels": pixels[s : s + bs],  # b × [3, h, w]
                        "chunk": np.full(min(bs, n - s), int(chunk), np.int64),
                    }
                )
                for s in range(0, n, bs)
            ]
            if int(chunk) == self.fail_at_chunk:
                self.drill(int(chunk))
            counts = write_part(pa.concat_tables(tables), self.output, int(chunk), self.storage)  # type: ignore[arg-type]
            out["chunk"].append(int(chunk))
            out["rows"].append(counts["rows"])
            out["errors"].append(counts["errors"])
            out["reasons"].append(json.dumps(counts["reasons"]))
        return {
            "chunk": np.array(out["chunk"], np.int64),
            "rows": np.array(out["rows"], np.int64),
            "errors": np.array(out["errors"], np.int64),
            "reasons": np.array(out["reasons"], dtype=object),
        }

    def drill(self, chunk: int) -> None:
        """``actors.fail_at_chunk``: exit hard, once (a marker makes it once)."""
        marker = st.join(str(self.output), "_debug", f"actor-killed-at-chunk-{chunk}")
        if not st.exists(marker, self.storage):
            st.write_text(marker, "killed by actors.fail_at_chunk\n", self.storage)
            os._exit(1)

    def rows(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Decoded rows → the part's rows (predictions, or the error of each failed row)."""
        n = len(batch["path"])
        errors: list[str | None] = [str(e) if e else None for e in batch["error"]]
        ok = [i for i in range(n) if errors[i] is None]
        results: dict[int, dict[str, Any]] = {}
        if ok:
            sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in ok]
            prepared = [np.asarray(batch["pixels"][i]) for i in ok]  # [3, h, w] each
            # one forward per shape: keep-ratio (segmentation) images differ
            for i, res in zip(ok, self.predictor.forward_prepared(prepared, sizes), strict=True):
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
    """A class-id map as a lossless PNG in the shared palette (:func:`masks.mask_png`)."""
    from beit_ray.infer.masks import mask_png

    return mask_png(mask)


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
    # segment slides windows over images of any size; classify and embed need one size
    if cfg.task != "segment" and not preprocessor.fixed_size:
        raise ConfigError(
            f"checkpoint: {folder}'s preprocessor gives images of varying sizes (size {preprocessor.size}, no crop); --task {cfg.task} needs a fixed size"
        )
    return preprocessor


def check_outputs(cfg: LabelConfig) -> None:
    """On a multi-node cluster, parts, masks (``_masks/``) and the plan go to shared storage:
    actors on every node write there. Joins Ray only when the job joins a cluster."""
    from beit_ray.runtime import check_job_outputs

    check_job_outputs({"output": cfg.output}, cfg.ray, cfg.storage)


def label(cfg: LabelConfig, *, stop_after_chunks: int | None = None) -> dict[str, Any]:
    """Label every input not yet written; returns (and writes) the summary.

    ``stop_after_chunks`` writes only that many of the pending chunks (object-store tars: whole
    tars), then raises :class:`LabelInterrupted` (a crash stand-in for tests); rerunning
    finishes the rest.
    """
    cfg.require()
    start = time.perf_counter()
    check_outputs(cfg)
    preprocessor = check_checkpoint(cfg)  # before any cluster work
    plan = saved_plan(cfg)  # a rerun: the first run's plan, nothing listed or read again
    if plan is None:  # a first run, or --relist: list, and plan what is new
        layout, listing = resolve_layout(cfg, old_layout(cfg))
        if not listing.count:
            raise ConfigError(f"input: no {layout} inputs found under {cfg.input}")
        plan = build_plan(cfg, layout, listing)
    layout = plan.layout
    done = done_chunks(cfg.output, cfg.storage)
    ledger = Ledger(cfg.output, cfg.storage).load()
    marks = tar_marks(cfg.output, cfg.storage) if plan.mode == "tars" else {}

    def part_uri(c: int) -> str:
        return st.join(cfg.output, part_name(c))

    coverage(plan, done, ledger, part_uri, cfg.storage, marks)  # the parts present are whole
    pending, resumed = pending_work(plan, done, marks, cfg.storage)
    if plan.mode == "tars":
        print0(
            f"label: {plan.chunks} {layout} files, each read once by one task; "
            f"{resumed} already written"
        )
    else:
        print0(
            f"label: {plan.inputs} images ({layout}) in {plan.chunks} chunks; "
            f"{resumed} already written"
        )
    if stop_after_chunks is not None:  # chunks, or whole tars
        pending = pending[:stop_after_chunks]
    processed, run_seconds, timing = 0, 0.0, {}
    if pending:
        run_start = time.perf_counter()  # images/s counts the pipeline, not Ray's start-up
        ds = _graph(cfg, plan, pending, preprocessor)
        try:
            processed, timing = _collect(ds, ledger, run_start)
        finally:
            ledger.flush()
        run_seconds = time.perf_counter() - run_start
    ledger.compact()
    if stop_after_chunks is not None:
        raise LabelInterrupted(f"stopped after {len(pending)} chunks (stop_after_chunks)")
    summary = _summarize(cfg, plan, ledger, processed, run_seconds, resumed, part_uri)
    summary.update(timing)
    summary["seconds_total"] = round(time.perf_counter() - start, 3)
    summary["preview"] = _preview(cfg, plan, summary, fresh=processed > 0)
    st.write_text(st.join(cfg.output, SUMMARY_NAME), json.dumps(summary, indent=1), cfg.storage)
    print0(
        f"label: {summary['ok']}/{summary['files']} labelled, {summary['errors']} errors; "
        f"{processed} this run at {summary['images_per_s']:.1f} images/s → {cfg.output}"
    )
    return summary


def _preview(cfg: LabelConfig, plan: Plan, summary: dict[str, Any], fresh: bool) -> str | None:
    """``_PREVIEW.html`` (:mod:`beit_ray.infer.preview`), rewritten when this run labelled
    something or none exists; a preview that fails is reported, never fails the run."""
    from beit_ray.infer.preview import PREVIEW_NAME, write_preview

    uri = st.join(cfg.output, PREVIEW_NAME)
    try:
        if fresh or not st.exists(uri, cfg.storage):
            write_preview(cfg, plan, summary)
        return uri
    except Exception as e:
        print0(f"label: no preview ({type(e).__name__}: {e})")
        return None


def _graph(cfg: LabelConfig, plan: Plan, items: list[dict[str, Any]], preprocessor: Any) -> Any:
    """Pending work items (chunk ids, or tar URIs: the inputs stay in the plan file) → read/decode
    tasks → predictor actors that write the parts."""
    import ray

    from beit_ray.runtime import init_ray

    init_ray(cfg.ray, cfg.storage)
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 1000))
    ds = ds.map_batches(
        read_decode,
        fn_kwargs={
            "plan": plan,
            "preprocessor": preprocessor,
            "max_pixels": cfg.predict.max_pixels,
            "storage": cfg.storage,
            "image_column": cfg.image_column,
            "output": cfg.output,
            "root": input_root(cfg),
            "masks": cfg.task == "segment",
        },
        batch_size=1,
        num_cpus=cfg.actors.decode_cpus,
        **st.TASK_RETRIES,  # a read that outlived its own retries: the task runs again
    )
    a = cfg.actors
    return ds.map_batches(
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
            "output": cfg.output,
            "batch_size": cfg.predict.batch_size,
            "fail_at_chunk": a.fail_at_chunk,
        },
        compute=ray.data.ActorPoolStrategy(min_size=a.min_actors, max_size=a.max_actors),
        batch_size=1,  # one chunk: the actor runs it in predict.batch_size forward passes
        num_cpus=a.num_cpus,
        num_gpus=a.num_gpus,
        batch_format="numpy",
    )


def _collect(ds: Any, ledger: Ledger, start: float) -> tuple[int, dict[str, float | None]]:
    """Stream the written parts' counts into the ledger. Returns the rows written and the
    timing: seconds to the first part (worker/actor start-up, model load) and the steady
    images/s after it (None when every part came at once)."""
    processed = first_rows = 0
    first = last = 0.0
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        last = time.perf_counter()
        rows = int(np.sum(batch["rows"]))
        if not processed:
            first, first_rows = last, rows
        processed += rows
        for c, r, e, why in zip(
            batch["chunk"], batch["rows"], batch["errors"], batch["reasons"], strict=True
        ):
            ledger.add(int(c), int(r), int(e), json.loads(str(why)))
        ledger.maybe_flush()
    steady = (
        (processed - first_rows) / (last - first)
        if last > first and processed > first_rows
        else None
    )
    return processed, {
        "seconds_to_first_result": round(first - start, 3) if processed else 0.0,
        "images_per_s_after_first": None if steady is None else round(steady, 3),
    }


def _summarize(
    cfg: LabelConfig,
    plan: Plan,
    ledger: Ledger,
    processed: int,
    seconds: float,
    resumed: int,
    part_uri: Any,
) -> dict[str, Any]:
    """Counts over every part (from the ledger), each part checked against its chunk's size."""
    done = done_chunks(cfg.output, cfg.storage)
    marks = tar_marks(cfg.output, cfg.storage) if plan.mode == "tars" else {}
    gap = incomplete(plan, done, marks)
    if gap:
        raise RuntimeError(f"output does not match the input list: {gap}")
    totals = coverage(plan, done, ledger, part_uri, cfg.storage, marks)
    if totals["recovered"]:
        ledger.compact()
    reasons = totals["reasons"]
    return {
        "input": cfg.input,
        "output": cfg.output,
        "checkpoint": cfg.checkpoint,
        "task": cfg.task,
        "layout": cfg.layout,
        "files": totals["rows"],
        "ok": totals["rows"] - totals["errors"],
        "errors": totals["errors"],
        "error_reasons": dict(reasons.most_common()),
        "chunks": len(done),
        "chunks_resumed": resumed,
        "processed_this_run": processed,
        "seconds": round(seconds, 3),
        "images_per_s": round(processed / seconds, 3) if seconds > 0 else 0.0,
        "config": to_dict(cfg, redact=True),
    }
