"""Requests and bytes per image, every job x layout, on moto S3 (issue #23).

    python bench/scale_io.py                                  # 6 layouts x 5 jobs, 2,000 images
    python bench/scale_io.py --layouts class_tars,webdataset --jobs train,label --n 2000
    python bench/scale_io.py --json io.json                   # rows also as JSON
    python bench/scale_io.py --table io.json io2.json         # the table of earlier runs

Inputs: ``--n`` copies of one 128x128 JPEG (~15 KB) in bucket ``src`` of the bench's loopback
moto server (objects put straight into its backend: no upload requests), in six layouts:

    folders      src/folders/c<k>/<i>.jpg       8 class folders
    flat         src/flat/<i>.jpg               one flat prefix of loose images
    manifest     work/manifest/m.parquet        a ``path`` column of the flat prefix's URIs
    class_tars   src/class_tars/n<t>.tar        8 tars (ImageNet-22k style)
    webdataset   src/webdataset/shard-<t>.tar   8 shards of <key>.jpg + <key>.cls
    parquet      src/parquet/part-<t>.parquet   8 files of image bytes (one row group each)

Jobs, each a child process joined to one local Ray (4 logical CPUs), everything they write in
bucket ``work``:

    train     pretraining as jobs/pretrain.py builds it (``list_parts`` with its counting, one
              epoch of ``pretraining_dataset`` with an epoch clock), every row read
    finetune  ``list_parts`` with a 5 % split, one train epoch and the val pass
    label     ``label()`` with the tiny ``debug`` classifier (1 actor)
    tokenize  ``materialize`` (jobs/tokenize_shards.py, tokenizer none, 500 images a shard)
    fit       ``fit_codebook`` on a sample of ``--fit-sample`` images (16 codes, 2 iterations)

Every HTTP request moto answers is counted by :class:`scale.Counting`, by kind and bucket:
object GETs of ``src`` (the inputs) apart from LIST requests and from GETs of ``work`` (the job's
own listing, plan, ledger). Per image: input GETs, input bytes sent over the images' bytes (and
over the containers' bytes for tars and parquet), LIST requests of ``src`` per input object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402 - the bench beside this one: moto, the counter, child processes

LAYOUTS = ("folders", "flat", "manifest", "class_tars", "webdataset", "parquet")
JOBS = ("train", "finetune", "label", "tokenize", "fit")
CONTAINERS = 8
SRC, WORK = "src", "work"


# --------------------------------------------------------------------------- inputs


def image_bytes(size: int = 128) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buf, "JPEG", quality=90
    )
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet(rows: range, data: bytes, t: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {"image": [data] * len(rows), "label": [t] * len(rows), "key": [f"p{i:06d}" for i in rows]}
    )
    buf = io.BytesIO()
    # one JPEG under every key: dictionary encoding or compression would store it once
    pq.write_table(table, buf, use_dictionary=False, compression="none")
    return buf.getvalue()


def make_layout(layout: str, n: int, data: bytes) -> dict[str, Any]:
    """Put ``layout``'s objects into moto; returns where it is and what its bytes are."""
    per = -(-n // CONTAINERS)
    groups = [range(t * per, min(n, (t + 1) * per)) for t in range(CONTAINERS)]
    objects: dict[str, bytes] = {}
    if layout == "folders":
        objects = {f"c{i % CONTAINERS:02d}/{i:06d}.jpg": data for i in range(n)}
    elif layout in ("flat", "manifest"):
        objects = {f"{i:06d}.jpg": data for i in range(n)}
    elif layout == "class_tars":
        objects = {
            f"n{t:04d}.tar": _tar([(f"n{t:04d}_{i}.JPEG", data) for i in g])
            for t, g in enumerate(groups)
        }
    elif layout == "webdataset":
        objects = {
            f"shard-{t:04d}.tar": _tar(
                [m for i in g for m in ((f"{i:06d}.jpg", data), (f"{i:06d}.cls", str(t).encode()))]
            )
            for t, g in enumerate(groups)
        }
    elif layout == "parquet":
        objects = {f"part-{t:04d}.parquet": _parquet(g, data, t) for t, g in enumerate(groups)}
    prefix = "flat" if layout == "manifest" else layout
    scale.s3_objects(SRC, prefix, objects)
    out = {
        "src": f"s3://{SRC}/{prefix}", "objects": len(objects), "images": n,
        "image_bytes": n * len(data), "object_bytes": sum(len(v) for v in objects.values()),
        "manifest": None,
    }  # fmt: skip
    if layout == "manifest":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        paths = [f"s3://{SRC}/flat/{k}" for k in sorted(objects)]
        pq.write_table(pa.table({"path": paths, "size": [len(data)] * len(paths)}), buf)
        scale.s3_objects(WORK, "manifest", {"m.parquet": buf.getvalue()})
        out["manifest"] = f"s3://{WORK}/manifest/m.parquet"
    return out


# --------------------------------------------------------------------------- child steps


def phase(name: str) -> None:
    """Let the parent snapshot the request counts here (it answers with a newline)."""
    print(f"PHASE {name}", flush=True)
    sys.stdin.readline()


def _data(a: dict[str, Any]) -> Any:
    from beit_ray.data.config import DataConfig

    return DataConfig(
        source=a["src"], tokenizer="none", image_size=32, patch_size=8, tokenizer_image_size=32,
        rand_augment=None, manifest=a["manifest"], batch_size=64,
    )  # fmt: skip


def _ray() -> None:
    from beit_ray.config import RayConfig
    from beit_ray.runtime import init_ray

    init_ray(RayConfig())  # joins the bench's Ray (RAY_ADDRESS)


def _rows(ds: Any) -> tuple[int, int]:
    """Rows of one pass over ``ds`` and how many distinct keys they hold."""
    rows, keys = 0, set()
    for b in ds.iter_batches(batch_size=256, batch_format="numpy"):
        rows += len(b["key"])
        keys.update(str(k) for k in b["key"])
    return rows, len(keys)


def step_train(a: dict[str, Any]) -> dict[str, Any]:
    """jobs/pretrain.py's data (train/data.py::pretraining_data), one whole epoch."""
    from beit_ray.data.listing import list_parts
    from beit_ray.data.pipeline import pretraining_dataset
    from beit_ray.data.plan import make_clock

    _ray()
    cfg = _data(a)
    t = time.perf_counter()
    listing = list_parts(cfg, None, uri=a["out"] + "/listing")  # counted, as the job does
    phase("listed")
    rows, keys = _rows(pretraining_dataset(cfg, listing=listing, clock=make_clock()))
    return {"seconds": time.perf_counter() - t, "rows": rows, "keys": keys}


def step_finetune(a: dict[str, Any]) -> dict[str, Any]:
    """jobs/finetune.py's data with a 5 % key-hash split: one train epoch, one val pass."""
    from beit_ray.data.listing import list_parts
    from beit_ray.data.pipeline import labelled_dataset
    from beit_ray.data.plan import make_clock

    _ray()
    cfg = _data(a)
    t = time.perf_counter()
    listing = list_parts(cfg, None, uri=a["out"] + "/listing", val_fraction=0.05)
    phase("listed")
    common = {"val_fraction": 0.05, "listing": listing, "classes_write_to": a["out"] + "/c.json"}
    train, _ = _rows(labelled_dataset(cfg, "train", clock=make_clock(), **common))
    val, _ = _rows(labelled_dataset(cfg, "val", **common))
    return {"seconds": time.perf_counter() - t, "rows": train + val, "train": train, "val": val}


def step_label(a: dict[str, Any]) -> dict[str, Any]:
    from beit_ray.config import parse_args
    from beit_ray.infer.config import LabelConfig
    from beit_ray.infer.label import label

    args = ["--input", a["manifest"] or a["src"], "--output", a["out"], "--checkpoint", a["ckpt"],
            "--ray.num_cpus", "4", "--actors.num_cpus", "1", "--actors.max_actors", "1",
            "--actors.decode_cpus", "0.5", "--predict.batch_size", "64"]  # fmt: skip
    if a["manifest"]:
        args += ["--manifest_column", "path"]
    t = time.perf_counter()
    summary = label(parse_args(LabelConfig, args))
    return {"seconds": time.perf_counter() - t, "rows": summary["files"], "ok": summary["ok"]}


def step_tokenize(a: dict[str, Any]) -> dict[str, Any]:
    from beit_ray.data.config import ShardConfig, TokenizeConfig
    from beit_ray.data.materialize import materialize

    cfg = TokenizeConfig(
        input=a["src"], output=a["out"], data=_data(a),
        shards=ShardConfig(images_per_shard=500, tars_per_shard=1),
    )  # fmt: skip
    _ray()
    t = time.perf_counter()
    counts = materialize(cfg, progress=False)
    return {"seconds": time.perf_counter() - t, "rows": counts["read"], **counts}


def step_fit(a: dict[str, Any]) -> dict[str, Any]:
    from beit_ray.data.config import CodebookConfig, FitTokenizerConfig
    from beit_ray.data.fit import fit_codebook

    cfg = FitTokenizerConfig(
        input=a["src"], output=a["out"] + "/codebook.safetensors", data=_data(a),
        codebook=CodebookConfig(vocab_size=16, sample_images=a["sample"], patches_per_image=4,
                                iterations=2),
    )  # fmt: skip
    _ray()
    t = time.perf_counter()
    fit_codebook(cfg)
    return {"seconds": time.perf_counter() - t, "rows": a["sample"]}


STEPS = {
    f.__name__[5:]: f for f in (step_train, step_finetune, step_label, step_tokenize, step_fit)
}


def child_main(step: str, args: dict[str, Any]) -> None:
    out = STEPS[step](args)
    out["peak_rss_mb"] = scale.rss_mb()
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- figures


def figures(layout: str, job: str, where: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """One cell: requests and bytes per image from the counts of the step's requests."""
    by, sent = res["s3"]["by_requests"], res["s3"]["by_bytes"]
    images = res["rows"] if job in ("fit",) else where["images"]

    def n(kind: str, bucket: str = SRC) -> int:
        return by.get(f"{kind} {bucket}", 0)

    lists = n("LIST")  # of the inputs; the output's own listings are in work_lists
    heads = sum(v for k, v in by.items() if k.startswith("HEAD "))
    writes = sum(v for k, v in by.items() if k.split()[0] in ("PUT", "POST", "DELETE"))
    got = sent.get(f"GET {SRC}", 0)
    row = {
        "layout": layout, "job": job, "images": images, "rows": res["rows"],
        "objects": where["objects"],
        "input_gets": n("GET"), "gets_per_image": n("GET") / images,
        "bytes_per_image_bytes": got / (images * where["image_bytes"] / where["images"]),
        "bytes_per_object_bytes": got / where["object_bytes"],
        "lists": lists, "lists_per_object": lists / where["objects"],
        "work_lists": n("LIST", WORK),
        "input_heads": n("HEAD"), "heads": heads, "work_gets": n("GET", WORK), "writes": writes,
        "work_bytes": sent.get(f"GET {WORK}", 0), "plan_gets": n("GET", WORK + ":_INPUTS"),
        "plan_bytes": sent.get(f"GET {WORK}:_INPUTS", 0),
        "requests_per_image": sum(by.values()) / images,
        "seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"],
    }  # fmt: skip
    listed = res.get("s3_listed")
    if listed:  # the listing phase alone (train, finetune)
        lb = listed["by_requests"]
        row["listing_input_gets"] = lb.get(f"GET {SRC}", 0)
        row["listing_input_bytes"] = listed["by_bytes"].get(f"GET {SRC}", 0) / where["object_bytes"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| layout | job | images | input GETs / image | input bytes / images' bytes | "
        "input bytes / objects' bytes | of which the listing (GETs, bytes / objects') | "
        "LIST / object | input HEADs | GETs of work | all requests / image | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        listing = (
            f"{r['listing_input_gets']}, {r['listing_input_bytes']:.4f}"
            if "listing_input_gets" in r
            else ""
        )
        out.append(
            f"| {r['layout']} | {r['job']} | {r['images']:,} | {r['gets_per_image']:.4f} | "
            f"{r['bytes_per_image_bytes']:.4f} | {r['bytes_per_object_bytes']:.4f} | {listing} | "
            f"{r['lists_per_object']:.4f} | {r['input_heads']} | {r['work_gets']} | "
            f"{r['requests_per_image']:.4f} | {r['seconds']:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--jobs", default=",".join(JOBS))
    p.add_argument("--n", type=int, default=2000, help="images per layout")
    p.add_argument("--fit-sample", type=int, default=256, help="images the codebook fit samples")
    p.add_argument("--root", default="/tmp/beit_scale", help="local folder for the checkpoint")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--table", nargs="+", help="only print the table of these JSON files")
    args = p.parse_args()
    if args.table:
        print(table([r for f in args.table for r in json.load(open(f))]))  # noqa: SIM115
        return
    layouts, jobs = args.layouts.split(","), args.jobs.split(",")
    for x in layouts + jobs:
        if x not in LAYOUTS + JOBS:
            p.error(f"unknown layout or job {x!r}")
    os.makedirs(args.root, exist_ok=True)
    ckpt = scale.checkpoint(args.root)
    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = scale.start_ray()
    _, counter = scale.start_moto()
    scale.s3_objects(WORK, "x", {})  # the bucket the jobs write to
    data = image_bytes()
    print(f"image: {len(data)} bytes; {args.n} images a layout", flush=True)
    rows: list[dict[str, Any]] = []
    run = f"s3://{WORK}/run-{os.getpid()}"
    for layout in layouts:
        where = make_layout(layout, args.n, data)
        for job in jobs:
            res = scale.run_child(
                job, counter, script=os.path.abspath(__file__), src=where["src"],
                manifest=where["manifest"], out=f"{run}/{layout}-{job}", ckpt=ckpt,
                sample=args.fit_sample,
            )  # fmt: skip
            rows.append(figures(layout, job, where, res))
            rows[-1]["by_requests"] = res["s3"]["by_requests"]
            print(table(rows[-1:]).splitlines()[-1], json.dumps(res["s3"]["by_requests"]),
                  flush=True)  # fmt: skip
            if args.json:  # after every cell: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    print()
    print(table(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
