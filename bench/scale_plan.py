"""A synthetic labelling plan and ledger at 1 M to 100 M inputs: driver memory and rerun time
(issue #23). No objects exist: only what labelling keeps about them.

    python bench/scale_plan.py --inputs 1000000,10000000          # 1 M and 10 M
    python bench/scale_plan.py --inputs 100000000     # 100 M: the plan's record, fill, rerun
    python bench/scale_plan.py --inputs 100000000 --build-up-to 100000000   # 100 M built (~7 min)
    python bench/scale_plan.py --writer-probe 2442,24415  # the plan writer alone, by row groups

Per N, under ``--root/n<N>`` (a local output; the input ``s3://big/in`` is never touched), each
step in a child process whose own peak RSS (VmHWM) is reported:

- ``listing``: N rows ``s3://big/in/c<k>/<i>.jpg`` written as :func:`list_inputs` leaves them,
  ``_LISTING/v0000/part-<range>.parquet`` of 16,384 rows (one key-range task's 16 pages) plus
  the index (:func:`~beit_ray.infer.inputs.save_listing`), generated in Arrow a part at a time.
- ``plan``: :func:`~beit_ray.infer.plan.build_plan` (files layout) from that listing:
  ``_INPUTS/part-*.parquet`` chunk rows of 256 inputs and ``_PLAN.json``; with the largest
  footer's size (a read task that opens a plan file reads all of it).
- ``fill``: the output as a finished run leaves it, without the model: one ``parts/<k>/part-<c>.parquet``
  name per chunk (empty files: a rerun lists the names and reads the ledger, never a part's
  bytes while the ledger holds its counts) and the ledger compacted to one ``_PARTS`` segment of
  every chunk's counts, ``_PREVIEW.html`` present (a rerun then keeps it).
- ``noop``: ``label()`` on the finished output (it reuses the saved plan: ``saved_plan``),
  asserted to label nothing.

Above ``--build-up-to`` (10 M), ``record`` replaces ``listing`` and ``plan``: ``_PLAN.json`` as
``build_plan`` writes it, without the listing and the chunk rows, which a no-op rerun never
reads (building them took 52 s + 286 s at 100 M on a quiet 2-core machine, ~20 µs an input
under load: pass ``--build-up-to 100000000`` when the machine is quiet).

Then the output's file count per prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402 - checkpoint, child processes, VmHWM

PART_ROWS = 16_384
PER_FOLDER = 1000
ROOT = "s3://big/in"


def _cfg(out: str, ckpt: str) -> Any:
    from beit_ray.config import parse_args
    from beit_ray.infer.config import LabelConfig

    return parse_args(LabelConfig, ["--input", ROOT, "--output", out, "--checkpoint", ckpt])


def step_listing(a: dict[str, Any]) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from beit_ray.infer.inputs import (
        LISTING_BATCH,
        LISTING_SCHEMA,
        Units,
        listing_folder,
        save_listing,
    )

    cfg, n = _cfg(a["out"], a["ckpt"]), a["n"]
    folder = listing_folder(cfg, 0)
    os.makedirs(folder, exist_ok=True)
    t = time.perf_counter()
    parts = []
    for k, start in enumerate(range(0, n, PART_ROWS)):
        i = pa.array(range(start, min(n, start + PART_ROWS)), pa.int64())
        pad = lambda x, w: pc.utf8_lpad(pc.cast(x, pa.string()), w, "0")  # noqa: E731
        folder_of = pc.divide(i, PER_FOLDER)
        paths = pc.binary_join_element_wise(
            ROOT + "/c", pad(folder_of, 6), "/", pad(i, 9), ".jpg", ""
        )
        sizes = pa.array([15_000] * len(i), pa.int64())
        uri = f"{folder}/part-{k:06d}.parquet"  # range names sort as the keys do
        pq.write_table(pa.table([paths, sizes], schema=LISTING_SCHEMA), uri,
                       row_group_size=LISTING_BATCH)  # fmt: skip
        parts.append(uri)
    units = Units(folder, n, {"tar": 0, "parquet": 0, "image": n}, parts, version=0, root=ROOT)
    save_listing(cfg, units)
    return {"seconds": time.perf_counter() - t, "parts": len(parts)}


def step_plan(a: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from beit_ray.infer.inputs import load_listing
    from beit_ray.infer.plan import build_plan

    cfg = _cfg(a["out"], a["ckpt"])
    t = time.perf_counter()
    plan = build_plan(cfg, "files", load_listing(cfg))  # type: ignore[arg-type]
    seconds = time.perf_counter() - t
    # every read task opening the plan reads a whole footer: the largest one at this N
    import glob
    import os

    files = (
        [plan.uri]
        if plan.uri.endswith(".parquet")
        else glob.glob(os.path.join(plan.uri, "part-*.parquet"))
    )
    metas = [pq.ParquetFile(f).metadata for f in files]
    return {"seconds": seconds, "chunks": plan.chunks, "inputs": plan.inputs,
            "files": len(files), "row_groups": sum(m.num_row_groups for m in metas),
            "footer_bytes": max(m.serialized_size for m in metas)}  # fmt: skip


def step_record(a: dict[str, Any]) -> dict[str, Any]:
    """The plan's record alone (``_PLAN.json`` as :func:`build_plan` writes it, one generation of
    N inputs) without its ``_INPUTS.parquet``: what a no-op rerun reads of a plan (it reads no
    chunk rows), for N where building the rows takes too long here."""
    from beit_ray.infer.plan import INPUTS_NAME, PLAN_NAME, Generation, _head

    cfg, n = _cfg(a["out"], a["ckpt"]), a["n"]
    os.makedirs(cfg.output, exist_ok=True)
    gen = Generation(os.path.join(cfg.output, INPUTS_NAME), 0, -(-n // cfg.chunk_size), n, "-")
    record = {**_head(cfg, "files"), "mode": "members", "listing": 0, "generations": [list(gen)]}
    with open(os.path.join(cfg.output, PLAN_NAME), "w") as f:
        json.dump(record, f, indent=1)
    return {"seconds": 0.0, "chunks": gen.chunks}


def step_fill(a: dict[str, Any]) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from beit_ray.infer.label import part_name
    from beit_ray.infer.plan import LEDGER_DIR, LEDGER_SCHEMA, saved_plan
    from beit_ray.infer.preview import PREVIEW_NAME

    cfg = _cfg(a["out"], a["ckpt"])
    t = time.perf_counter()
    plan = saved_plan(cfg)
    assert plan is not None
    for c in range(plan.chunks):
        path = os.path.join(cfg.output, part_name(c))
        if c % 10_000 == 0:  # parts come in folders (parts/<k>/)
            os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    rows = [plan.chunk_rows(c) for c in range(plan.chunks)]
    ledger = pa.table(
        [list(range(plan.chunks)), rows, [0] * plan.chunks, [""] * plan.chunks],
        schema=LEDGER_SCHEMA,
    )
    os.makedirs(os.path.join(cfg.output, LEDGER_DIR), exist_ok=True)
    pq.write_table(
        ledger, os.path.join(cfg.output, LEDGER_DIR, f"seg-{time.time_ns():020d}.parquet")
    )
    with open(os.path.join(cfg.output, PREVIEW_NAME), "w") as f:
        f.write("<html></html>")
    return {"seconds": time.perf_counter() - t, "chunks": plan.chunks}


def step_noop(a: dict[str, Any]) -> dict[str, Any]:
    from beit_ray.infer.label import label

    cfg = _cfg(a["out"], a["ckpt"])
    import beit_ray.models.load  # noqa: F401 - imports are not the rerun's cost

    t = time.perf_counter()
    summary = label(cfg)
    assert summary["processed_this_run"] == 0, summary
    return {"seconds": time.perf_counter() - t, "files": summary["files"]}


def step_writer(a: dict[str, Any]) -> dict[str, Any]:
    """The plan's parquet writer alone: ``n`` one-row row groups in the plan's schema. Its peak
    is what holding ``n`` row groups' metadata (and serializing the footer) costs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from beit_ray.infer.inputs import Entry
    from beit_ray.infer.plan import PLAN_SCHEMA

    row: dict[str, Any] = {"chunk": [0]}
    for f in Entry._fields:
        row[f] = [[-1, 5] if f in ("offset", "size") else [ROOT + "/c000123/000123456.jpg"] * 2]
    table, path = pa.table(row, schema=PLAN_SCHEMA), a["out"] + ".parquet"
    base, t = scale.rss_mb(), time.perf_counter()
    with pq.ParquetWriter(path, PLAN_SCHEMA) as w:
        for _ in range(a["n"]):
            w.write_table(table)
        written = scale.rss_mb()
    footer = pq.ParquetFile(path).metadata.serialized_size
    os.remove(path)
    return {"seconds": time.perf_counter() - t, "rss_before_mb": base,
            "peak_before_close_mb": written, "footer_bytes": footer}  # fmt: skip


STEPS = {
    f.__name__[5:]: f
    for f in (step_listing, step_plan, step_record, step_fill, step_noop, step_writer)
}


def child_main(step: str, args: dict[str, Any]) -> None:
    out = STEPS[step](args)
    out["peak_rss_mb"] = scale.rss_mb()
    print("RESULT " + json.dumps(out), flush=True)


def files_per_prefix(out: str) -> dict[str, int]:
    """Files directly in each folder of the output (the prefixes an S3 output would have)."""
    counts = {}
    for folder, _, files in os.walk(out):
        counts[os.path.relpath(folder, out)] = len(files)
    return counts


def du_mb(path: str) -> float:
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--inputs", default="1000000,10000000", help="input counts")
    p.add_argument("--root", default="/tmp/beit_plan")
    p.add_argument("--keep", action="store_true", help="keep each output (default: removed)")
    p.add_argument("--build-up-to", type=int, default=10_000_000,
                   help="above this N, write the plan's record only (no listing, no chunk rows)")  # fmt: skip
    p.add_argument("--json", default="")
    p.add_argument("--writer-probe", default="",
                   help="row-group counts: only the plan writer's peak RSS for each")  # fmt: skip
    args = p.parse_args()
    os.makedirs(args.root, exist_ok=True)
    if args.writer_probe:
        for g in (int(x) for x in args.writer_probe.split(",")):
            res = scale.run_child("writer", None, script=os.path.abspath(__file__),
                                  out=os.path.join(args.root, "probe"), n=g)  # fmt: skip
            print(f"{g:,} row groups: {json.dumps(res)}", flush=True)
        return
    ckpt = scale.checkpoint(args.root)
    os.environ.pop("RAY_ADDRESS", None)  # a local no-op rerun starts no Ray
    rows = []
    for n in (int(x) for x in args.inputs.split(",")):
        out = os.path.join(args.root, f"n{n}")
        shutil.rmtree(out, ignore_errors=True)
        full = n <= args.build_up_to
        for step in ("listing", "plan", "fill", "noop") if full else ("record", "fill", "noop"):
            res = scale.run_child(step, None, script=os.path.abspath(__file__), out=out, n=n,
                                  ckpt=ckpt)  # fmt: skip
            rows.append({"n": n, "step": step, **res})
            print(f"| {n:,} | {step} | {res['seconds']:.1f} | {res['peak_rss_mb']:.0f} |",
                  flush=True)  # fmt: skip
        prefixes = files_per_prefix(out)
        rows.append({"n": n, "step": "files", "prefixes": prefixes, "mb": du_mb(out)})
        print(f"files per prefix at {n:,}: {json.dumps(prefixes)}; {du_mb(out):.0f} MB", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
