"""Scale bench (issues #16, #23): driver memory, time and S3 requests as the input count grows.

    python bench/scale.py                       # 10k, 100k local; 10k, 100k on moto S3
    python bench/scale.py --big                 # + 1M local files
    python bench/scale.py --sizes 10000 --s3-sizes 10000 --label-n 2000   # quick
    python bench/scale.py --sizes "" --s3-sizes 10000,100000 --s3-train --s3-label-n 0 \
        --label-n 0 --tars ""                   # every listing and plan step on moto (#23)

Beside it: ``bench/scale_io.py`` (requests and bytes per image, every job x layout on moto)
and ``bench/scale_plan.py`` (a synthetic labelling plan and ledger at 1 M to 100 M inputs).

Synthetic inputs: one tiny JPEG's bytes under many names (class folders of 1,000 files),
written once per size under --root; on S3 the objects go straight into the loopback moto
server's backend (no upload requests), and every HTTP request the server answers is counted
by a WSGI wrapper (method, bytes sent; and by kind and bucket: LIST, object GET, HEAD, PUT).
Each measurement runs in a child process, so the driver's peak RSS (its own VmHWM, see
:func:`rss_mb`) is that step's alone. Steps:

- ``listing``: :func:`beit_ray.infer.inputs.list_inputs` (streamed, sorted, to parquet).
- ``label plan``: that listing read back, then :func:`beit_ray.infer.plan.build_plan`.
- ``label``: a full :func:`~beit_ray.infer.label.label` run (tiny ``debug`` classifier) at
  ``--label-n`` inputs (through a model, 2 cores: 100k would take too long here).
- ``noop``: the same command rerun on a finished output: at every N, the output is first
  completed by writing each chunk's part directly (the rows a run would write, minus the model).
  The fill writes no ``_PREVIEW.html``, so the first rerun writes it (it reads every part); on
  S3 a second rerun then measures the plain no-op rerun.
- ``tars``: a labelling run over class tars on S3 (``--tars``), then its no-op rerun: bytes of
  the tars fetched (GETs of .tar objects), over the tars' size, and requests per image.
- ``train listing``: :func:`beit_ray.data.listing.list_parts`, the training jobs' listing
  (parallel Ray tasks, shuffled parquet parts, a 5 % validation split counted); on S3 with
  ``--s3-train`` (the listing under ``s3://in<N>/train-listing``).
- ``pretrain first batch``: pretraining data built from that listing (read back, as a run
  does) to its first batch of 32 rows.
- ``finetune build``: fine-tuning data (train + val by key hash, class index, rows per epoch
  from the listing) to its first training batch.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PER_FOLDER = 1000


# --------------------------------------------------------------------------- inputs


def tiny_jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def local_tree(root: str, n: int) -> str:
    """``root/n<N>/c<k>/<i>.jpg``: n copies of one JPEG (reused when already there)."""
    folder = os.path.join(root, f"n{n}")
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    data = tiny_jpeg()
    for i in range(n):
        d = os.path.join(folder, f"c{i // PER_FOLDER:05d}")
        if i % PER_FOLDER == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i:08d}.jpg"), "wb") as f:
            f.write(data)
    open(done, "w").close()
    return folder


class Counting:
    """WSGI wrapper: counts the requests moto answers and the bytes it sends, by method, and by
    ``"<kind> <bucket>"`` (kind: LIST for a key-less GET that lists, GET / HEAD / PUT / POST /
    DELETE of an object, BUCKET for other key-less requests; ``<bucket>:_INPUTS`` for the
    labelling plan's ``_INPUTS*.parquet``)."""

    def __init__(self, app: Any) -> None:
        self.app, self.lock = app, threading.Lock()
        self.requests: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.tars: Counter[str] = Counter()  # GETs of .tar objects: requests, bytes
        self.by_requests: Counter[str] = Counter()
        self.by_bytes: Counter[str] = Counter()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        method = environ["REQUEST_METHOD"]
        body = list(self.app(environ, start_response))
        sent = sum(len(b) for b in body)
        bucket, _, key = environ["PATH_INFO"].lstrip("/").partition("/")
        kind = method if key else ("LIST" if method == "GET" and _lists(environ) else "BUCKET")
        if "/_INPUTS" in key:  # the labelling plan's chunk rows: read by every read task
            bucket += ":_INPUTS"
        with self.lock:
            self.requests[method] += 1
            self.bytes[method] += sent
            self.by_requests[f"{kind} {bucket}"] += 1
            self.by_bytes[f"{kind} {bucket}"] += sent
            if method == "GET" and environ["PATH_INFO"].endswith(".tar"):
                self.tars["requests"] += 1
                self.tars["bytes"] += sent
        return body

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"requests": dict(self.requests), "bytes": dict(self.bytes),
                    "tars": dict(self.tars), "by_requests": dict(self.by_requests),
                    "by_bytes": dict(self.by_bytes)}  # fmt: skip


def _lists(environ: dict[str, Any]) -> bool:
    """A GET of a bucket that lists its keys (ListObjects v1 / v2), not its location etc."""
    query = environ.get("QUERY_STRING", "")
    names = {q.split("=", 1)[0] for q in query.split("&") if q}
    return not names or bool(names & {"list-type", "prefix", "delimiter", "marker", "max-keys"})


def start_moto() -> tuple[str, Counting]:
    import logging

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret", AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )  # fmt: skip
    return endpoint, app


def s3_objects(bucket: str, prefix: str, objects: dict[str, bytes] | tuple[int, bytes]) -> None:
    """Objects put straight into moto's backend (this process serves them): no requests."""
    import boto3
    from moto.s3.models import s3_backends

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    backend = s3_backends["123456789012"]["aws"]
    if isinstance(objects, tuple):
        n, data = objects
        objects = {f"c{i // PER_FOLDER:05d}/{i:08d}.jpg": data for i in range(n)}
    for key, data in objects.items():
        backend.put_object(bucket, f"{prefix}/{key}", data)


# --------------------------------------------------------------------------- child steps


def _cfg(src: str, out: str, ckpt: str, chunk_size: int = 256) -> Any:
    from beit_ray.config import parse_args
    from beit_ray.infer.config import LabelConfig

    return parse_args(
        LabelConfig,
        ["--input", src, "--output", out, "--checkpoint", ckpt, "--chunk_size", str(chunk_size),
         "--ray.num_cpus", "4", "--actors.num_cpus", "1", "--actors.max_actors", "1",
         "--predict.batch_size", "64", "--actors.decode_cpus", "0.5"],
    )  # fmt: skip


def step_listing(a: dict[str, Any]) -> dict[str, Any]:
    import beit_ray.data.sources  # noqa: F401 - imports (torch) are not the listing's cost
    from beit_ray.infer.inputs import list_inputs

    cfg = _cfg(a["src"], a["out"], "x")
    t = time.perf_counter()
    units = list_inputs(cfg)
    return {"seconds": time.perf_counter() - t, "count": units.count}


def step_label(a: dict[str, Any]) -> dict[str, Any]:
    from beit_ray.infer.label import label

    cfg = _cfg(a["src"], a["out"], a["ckpt"])
    t = time.perf_counter()
    summary = label(cfg)
    return {"seconds": time.perf_counter() - t, "files": summary["files"],
            "ok": summary["ok"], "images_per_s": summary["images_per_s"]}  # fmt: skip


def step_plan(a: dict[str, Any]) -> dict[str, Any]:
    """The labelling plan of an output whose listing is saved (the ``listing`` step's):
    the listing read back, then :func:`~beit_ray.infer.plan.build_plan` (``_INPUTS.parquet``)."""
    from beit_ray.infer.inputs import resolve_layout
    from beit_ray.infer.plan import build_plan

    cfg = _cfg(a["src"], a["out"], a["ckpt"])
    t = time.perf_counter()
    layout, units = resolve_layout(cfg)
    assert units.reused, "the listing step's listing is read back, not walked again"
    plan = build_plan(cfg, layout, units)
    return {"seconds": time.perf_counter() - t, "chunks": plan.chunks}


def step_fill(a: dict[str, Any]) -> dict[str, Any]:
    """Complete an output without the model: plan, then each chunk's part (rows as a run
    writes them, errors null), then the ledger; what a finished labelling run leaves."""
    import pyarrow as pa

    from beit_ray.infer.inputs import resolve_layout
    from beit_ray.infer.label import check_checkpoint, done_chunks, task_schema, write_part
    from beit_ray.infer.plan import Ledger, build_plan, read_chunk

    cfg = _cfg(a["src"], a["out"], a["ckpt"])
    check_checkpoint(cfg)
    layout, units = resolve_layout(cfg)
    plan = build_plan(cfg, layout, units)
    done, ledger = done_chunks(cfg.output, cfg.storage), Ledger(cfg.output, cfg.storage)
    schema = task_schema("classify").append(pa.field("chunk", pa.int64()))
    for c in range(plan.chunks):
        if c in done:
            continue
        paths = [e.path for e in read_chunk(plan.uri, c, plan.chunk_size, cfg.storage)]
        n = len(paths)
        cols = {"path": paths, "error": [None] * n, "height": [32] * n, "width": [32] * n,
                "top_ids": [[0]] * n, "top_labels": [["x"]] * n, "top_scores": [[1.0]] * n,
                "chunk": [c] * n}  # fmt: skip
        counts = write_part(pa.table(cols, schema=schema), cfg.output, c, cfg.storage)
        ledger.add(c, counts["rows"], counts["errors"], counts["reasons"])
    ledger.compact()
    return {"chunks": plan.chunks}


def step_noop(a: dict[str, Any]) -> dict[str, Any]:
    from beit_ray.infer.label import label

    cfg = _cfg(a["src"], a["out"], a["ckpt"])
    import beit_ray.data.sources  # noqa: F401 - imports are not the rerun's cost
    import beit_ray.models.load  # noqa: F401

    t = time.perf_counter()
    summary = label(cfg)
    assert summary["processed_this_run"] == 0, summary
    return {"seconds": time.perf_counter() - t, "files": summary["files"]}


def step_tars(a: dict[str, Any]) -> dict[str, Any]:
    """Label class tars on S3 as the job does (each tar streamed once by one read task)."""
    from beit_ray.infer.label import label

    cfg = _cfg(a["src"], a["out"], a["ckpt"])
    t = time.perf_counter()
    summary = label(cfg)
    assert summary["ok"] == summary["files"], summary["error_reasons"]
    return {"seconds": time.perf_counter() - t, "files": summary["files"],
            "images_per_s": summary["images_per_s"]}  # fmt: skip


def _steps() -> dict[str, Any]:
    fns = (step_listing, step_plan, step_label, step_fill, step_noop, step_tars, step_trainlist,
           step_pretrain, step_finetune)  # fmt: skip
    return {f.__name__[5:]: f for f in fns}


def rss_mb(field: str = "VmHWM") -> float:
    """This process's own peak (VmHWM) or current (VmRSS) resident set, from /proc. Not
    ``ru_maxrss``: on Linux a spawned child starts with its parent's high-water mark (it crosses
    fork/vfork + exec), and this bench's parent holds moto's objects, ~10 KB each."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child_main(step: str, args: dict[str, Any]) -> None:
    import resource

    out = _steps()[step](args)
    out["peak_rss_mb"] = rss_mb()
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # see rss_mb
    print("RESULT " + json.dumps(out), flush=True)


def run_child(
    step: str, counter: Counting | None = None, script: str = __file__, **args: Any
) -> dict[str, Any]:
    """One step of ``script`` (this bench, or one beside it with its own ``child_main``) in a
    fresh process; with a counter, the S3 requests it made (per phase: a ``PHASE name`` line)."""
    before = counter.snapshot() if counter else None
    proc = subprocess.Popen(
        [sys.executable, script, "--child", step, json.dumps(args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    lines, phases = [], {}
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith("PHASE "):
            phases[line.split()[1]] = counter.snapshot() if counter else None
            proc.stdin.write("\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
    proc.wait()
    result = [x for x in lines if x.startswith("RESULT ")]
    if proc.returncode or not result:
        raise RuntimeError(f"{step} failed:\n" + "".join(lines[-30:]))
    out = json.loads(result[-1][7:])
    out["parent_rss_mb"] = rss_mb("VmRSS")
    if counter:
        out["s3"] = _diff(counter.snapshot(), before)  # type: ignore[arg-type]
        for name, snap in phases.items():
            out[f"s3_{name}"] = _diff(snap, before)  # type: ignore[arg-type]
            out["s3_after_" + name] = _diff(counter.snapshot(), snap)  # type: ignore[arg-type]
    return out


def _diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {k: {m: after[k].get(m, 0) - before[k].get(m, 0) for m in after[k]} for k in after}


# --------------------------------------------------------------------------- training data


def _train_cfg(src: str, listing: str) -> Any:
    from beit_ray.data.config import DataConfig

    return DataConfig(source=src, tokenizer="none", image_size=32, patch_size=8,
                      tokenizer_image_size=32, listing_uri=listing, rand_augment=None)  # fmt: skip


def step_trainlist(a: dict[str, Any]) -> dict[str, Any]:
    """The training jobs' listing (:func:`beit_ray.data.listing.list_parts`): class folders in
    parallel Ray tasks into shuffled parquet parts, with a 5 % validation split counted."""
    from beit_ray.config import RayConfig
    from beit_ray.data.listing import list_parts
    from beit_ray.runtime import init_ray

    init_ray(RayConfig())  # joins the bench's Ray (RAY_ADDRESS)
    t = time.perf_counter()
    listing = list_parts(_train_cfg(a["src"], a["listing"]), val_fraction=0.05)
    return {"seconds": time.perf_counter() - t, "images": listing.images(),
            "parts": len(listing.units)}  # fmt: skip


def step_pretrain(a: dict[str, Any]) -> dict[str, Any]:
    """Pretraining data as the job builds it, from its listing, to the first batch."""
    from beit_ray.config import RayConfig
    from beit_ray.data.listing import list_parts
    from beit_ray.data.pipeline import pretraining_dataset
    from beit_ray.data.plan import make_clock
    from beit_ray.runtime import init_ray

    init_ray(RayConfig())
    cfg = _train_cfg(a["src"], a["listing"])
    t = time.perf_counter()
    listing = list_parts(cfg, val_fraction=0.05)  # the run's listing, read back
    ds = pretraining_dataset(cfg, listing=listing, clock=make_clock())
    batch = next(iter(ds.iter_batches(batch_size=32)))
    return {"seconds": time.perf_counter() - t, "rows": len(batch["key"])}


def step_finetune(a: dict[str, Any]) -> dict[str, Any]:
    """Fine-tuning data as the job builds it (one listing; train and val split by key hash;
    class index; rows per epoch from the listing), to the first training batch."""
    from beit_ray.config import RayConfig
    from beit_ray.data.listing import list_parts
    from beit_ray.data.pipeline import classes_for, labelled_dataset
    from beit_ray.data.plan import make_clock
    from beit_ray.runtime import init_ray

    init_ray(RayConfig())
    cfg = _train_cfg(a["src"], a["listing"])
    t = time.perf_counter()
    listing = list_parts(cfg, val_fraction=0.05)
    common = {"val_fraction": 0.05, "listing": listing, "classes_write_to": a["classes"]}
    train = labelled_dataset(cfg, "train", clock=make_clock(), **common)
    labelled_dataset(cfg, "val", **common)
    names = classes_for(cfg, None, a["classes"], listing=listing)
    rows = listing.images("train")
    built = time.perf_counter() - t
    batch = next(iter(train.iter_batches(batch_size=32)))
    return {"seconds": time.perf_counter() - t, "built_s": built, "rows": rows,
            "classes": len(names or []), "batch": len(batch["key"])}  # fmt: skip


# --------------------------------------------------------------------------- main


def checkpoint(root: str) -> str:
    import torch

    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf

    path = os.path.join(root, "ckpt")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        export_hf(build_model("debug", "classification", num_labels=10), path,
                  id2label={i: f"c{i}" for i in range(10)})  # fmt: skip
    return path


def start_ray(tries: int = 5) -> str:
    """One local Ray for every child step (they join it as jobs): a loaded 2-core machine can
    miss Ray's 30 s raylet start-up, so starting once, with retries, keeps the bench going."""
    import ray

    for attempt in range(tries):
        try:
            ctx = ray.init(num_cpus=4, include_dashboard=False, configure_logging=False,
                           _temp_dir=tempfile.mkdtemp(prefix="ray_", dir="/tmp"))  # fmt: skip
            return ctx.address_info["gcs_address"]
        except Exception as e:
            print(f"ray start failed ({e}); retry {attempt + 1}", flush=True)
            ray.shutdown()
    raise RuntimeError("could not start Ray")


def fmt(rows: list[dict[str, Any]]) -> str:
    out = ["| where | N | step | seconds | driver peak RSS (MB) | S3 requests / image |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        per = r.get("requests_per_image")
        per = "" if per is None else f"{per:.4f}"
        out.append(f"| {r['where']} | {r['n']:,} | {r['step']} | {r['seconds']:.2f} | "
                   f"{r['peak_rss_mb']:.0f} | {per} |")  # fmt: skip
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="local file counts")
    p.add_argument("--big", action="store_true", help="also 1,000,000 local files")
    p.add_argument("--s3-sizes", default="10000,100000", help="S3 object counts ('' for none)")
    p.add_argument("--label-n", type=int, default=10000, help="inputs of the full labelling run")
    p.add_argument("--s3-label-n", type=int, default=2000, help="inputs of the S3 labelling run")
    p.add_argument("--tars", default="4x2500", help="class tars on S3: <tars>x<members>")
    p.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "beit_scale"))
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--train-only", action="store_true", help="only the training data steps")
    p.add_argument("--s3-train", action="store_true",
                   help="also the training listing and first batch at each --s3-sizes N")  # fmt: skip
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s] + ([1_000_000] if args.big else [])
    s3_sizes = [int(s) for s in args.s3_sizes.split(",") if s]
    os.makedirs(args.root, exist_ok=True)
    ckpt = checkpoint(args.root)
    if not os.environ.get("RAY_ADDRESS"):
        os.environ["RAY_ADDRESS"] = start_ray()
    run = os.path.join(args.root, f"run-{os.getpid()}")
    rows: list[dict[str, Any]] = []

    def add(where: str, n: int, step: str, res: dict[str, Any]) -> None:
        reqs = sum(res["s3"]["requests"].values()) if "s3" in res else None
        rows.append({"where": where, "n": n, "step": step, "seconds": res["seconds"],
                     "peak_rss_mb": res["peak_rss_mb"],
                     "requests_per_image": None if reqs is None else reqs / n, **res})  # fmt: skip
        print(fmt(rows[-1:]).splitlines()[-1] + f" ru_maxrss {res['ru_maxrss_mb']:.0f} MB, "
              f"bench parent {res['parent_rss_mb']:.0f} MB", flush=True)  # fmt: skip

    if args.label_n:
        src, out = local_tree(args.root, args.label_n), f"{run}/lab"
        add("local", args.label_n, "label", run_child("label", src=src, out=out, ckpt=ckpt))
        add("local", args.label_n, "noop rerun", run_child("noop", src=src, out=out, ckpt=ckpt))
    for n in sizes:
        src = local_tree(args.root, n)
        lst = f"{run}/t{n}"
        add("local", n, "train listing", run_child("trainlist", src=src, listing=lst))
        add("local", n, "pretrain first batch", run_child("pretrain", src=src, listing=lst))
        add("local", n, "finetune build", run_child("finetune", src=src, listing=lst,
                                                    classes=f"{run}/t{n}.classes.json"))  # fmt: skip
        if args.train_only:
            continue
        add("local", n, "listing", run_child("listing", src=src, out=f"{run}/l{n}"))
        run_child("fill", src=src, out=f"{run}/o{n}", ckpt=ckpt)
        add("local", n, "noop rerun", run_child("noop", src=src, out=f"{run}/o{n}", ckpt=ckpt))
    if s3_sizes or args.tars:
        _, counter = start_moto()
        data = tiny_jpeg()
        if args.s3_label_n:
            n = args.s3_label_n
            s3_objects(f"lab{n}", "in", (n, data))  # a bucket each: moto lists a bucket whole
            src, out = f"s3://lab{n}/in", f"s3://lab{n}/out"
            add("s3", n, "label", run_child("label", counter, src=src, out=out, ckpt=ckpt))
            add("s3", n, "noop rerun", run_child("noop", counter, src=src, out=out, ckpt=ckpt))
        for n in s3_sizes:
            s3_objects(f"in{n}", "in", (n, data))
            src, out = f"s3://in{n}/in", f"s3://in{n}/out"
            listed = f"{out}-listing"
            add("s3", n, "listing", run_child("listing", counter, src=src, out=listed))
            add("s3", n, "label plan",
                run_child("plan", counter, src=src, out=listed, ckpt=ckpt))  # fmt: skip
            run_child("fill", counter, src=src, out=out, ckpt=ckpt)
            add("s3", n, "noop rerun", run_child("noop", counter, src=src, out=out, ckpt=ckpt))
            # the first rerun wrote the preview the fill leaves out: this one finds it
            add("s3", n, "noop rerun, preview there",
                run_child("noop", counter, src=src, out=out, ckpt=ckpt))  # fmt: skip
            if args.s3_train:
                lst = f"s3://in{n}/train-listing"
                add("s3", n, "train listing", run_child("trainlist", counter, src=src, listing=lst))
                add("s3", n, "pretrain first batch",
                    run_child("pretrain", counter, src=src, listing=lst))  # fmt: skip
        if args.tars:
            from tests.test_scale_label import _tar  # noqa: PLC0415 - the same tar writer

            k, m = (int(x) for x in args.tars.split("x"))
            tars = {f"n{t:04d}.tar": _tar([(f"n{t:04d}_{i}.JPEG", data) for i in range(m)])
                    for t in range(k)}  # fmt: skip
            s3_objects("tars", "in", tars)
            size = sum(len(v) for v in tars.values())
            src, out = "s3://tars/in", f"s3://tars/out-{os.getpid()}"
            for step, name in (("tars", "label"), ("noop", "noop rerun")):
                res = run_child(step, counter, src=src, out=out, ckpt=ckpt)
                res["tar_bytes"] = res["s3"]["tars"].get("bytes", 0) / size
                add("s3", k * m, f"class tars ({k}x{m}) {name}", res)
                print(f"tar bytes read / tar size: {res['tar_bytes']:.4f} "
                      f"({res['s3']['tars'].get('requests', 0)} GETs of tars); "
                      f"{sum(res['s3']['requests'].values())} requests for {k * m} members",
                      flush=True)  # fmt: skip
    print()
    print(fmt(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
