"""Batch labelling throughput: jobs/label.py's path vs the loop a user would write.

    .venv/bin/python bench/label.py --images 200 [--flavour base]

Baseline: transformers ``pipeline("image-classification", model=DIR)`` called on the files one
at a time (the same exported checkpoint, same images, same machine, same run). Ours:
``beit_ray.infer.label.label`` (Ray Data: read + decode tasks → predictor actor pool → parquet)
with 1 actor (all cores) and with 2 actors (half the cores each), for each ``--dtypes`` value
(``predict.dtype``; the baseline stays the user's float32 loop, and for another dtype the same
loop with the model in that dtype is timed too). Images/s of ours count the pipeline from
submission to the last part written (Ray start-up excluded; printed apart).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def make_images(folder: str, n: int, seed: int = 0) -> list[str]:
    """``n`` JPEGs of 500×375 / 375×500 cut from scikit-image's real photos."""
    from beit_ray.train.demo_data import load_photo

    names = (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
    )
    photos = [load_photo(name) for name in names]
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)])
        w, h = (500, 375) if i % 2 else (375, 500)
        scale = max(w / img.width, h / img.height) * float(rng.uniform(1.0, 1.3))
        img = img.resize((int(img.width * scale) + 1, int(img.height * scale) + 1))
        x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        buf = io.BytesIO()
        img.crop((x, y, x + w, y + h)).save(buf, format="JPEG", quality=90)
        path = os.path.join(folder, f"img_{i:05d}.jpg")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        paths.append(path)
    return paths


def baseline(ckpt: str, paths: list[str], dtype: str = "float32") -> float:
    from transformers import pipeline

    pipe = pipeline("image-classification", model=ckpt, device="cpu", dtype=getattr(torch, dtype))
    pipe(paths[0])  # warm-up, as a user's second call would be
    start = time.perf_counter()
    for p in paths:
        pipe(p, top_k=5)
    return len(paths) / (time.perf_counter() - start)


def ours(
    ckpt: str, folder: str, out: str, actors: int, threads: int, batch: int, dtype: str
) -> tuple[float, float]:
    from beit_ray.config import parse_args
    from beit_ray.infer.config import LabelConfig
    from beit_ray.infer.label import label

    shutil.rmtree(out, ignore_errors=True)
    cfg = parse_args(
        LabelConfig,
        [
            "--input", folder, "--output", out, "--checkpoint", ckpt, "--task", "classify",
            "--predict.batch_size", str(batch), "--actors.min_actors", str(actors),
            "--actors.max_actors", str(actors), "--actors.num_cpus", "1", "--actors.threads", str(threads), "--predict.dtype", dtype,
        ],
    )  # fmt: skip
    start = time.perf_counter()
    summary = label(cfg)
    return summary["images_per_s"], summary["processed_this_run"] / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--flavour", default="base")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="predict.dtype values to run")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from beit_ray.config import RayConfig
    from beit_ray.models.build import build_model
    from beit_ray.models.load import export_hf
    from beit_ray.runtime import init_ray

    root = tempfile.mkdtemp(prefix="bench_label_")
    torch.manual_seed(0)
    ckpt = os.path.join(root, "ckpt")
    export_hf(build_model(args.flavour, "classification", num_labels=1000), ckpt)
    folder = os.path.join(root, "images")
    paths = make_images(folder, args.images)
    cores = os.cpu_count() or 1
    print(
        f"{args.images} images, {args.flavour} checkpoint, {cores} cores, torch threads {torch.get_num_threads()}"
    )

    base = baseline(ckpt, paths)
    print(f"baseline pipeline() one at a time: {base:.2f} images/s")
    t = time.perf_counter()
    init_ray(RayConfig(num_cpus=4))  # as jobs/label.py starts it
    print(f"ray start-up: {time.perf_counter() - t:.1f} s (not counted below)")
    half = max(1, cores // 2)
    for dtype in args.dtypes.split(","):
        runs = {}
        # One actor on all cores, then scaling: 1 → 2 actors of the same size (half the cores).
        for actors, threads in ((1, cores), (1, half), (2, half)):
            out = os.path.join(root, f"out-{dtype}-{actors}x{threads}")
            ips, wall = ours(ckpt, folder, out, actors, threads, args.batch, dtype)
            runs[(actors, threads)] = ips
            print(
                f"ours {dtype}, {actors} actor(s) x {threads} threads: {ips:.2f} images/s "
                f"({ips / base:.2f}x baseline; {wall:.2f} incl. actor start)",
                flush=True,
            )
        print(f"ours {dtype}: 1 -> 2 actors of {half} thread(s) "
              f"{runs[(2, half)] / runs[(1, half)]:.2f}x")  # fmt: skip
        if dtype != "float32":  # the same loop with the user's model in that dtype, for scale
            same = baseline(ckpt, paths, dtype)
            print(f"baseline pipeline() in {dtype}: {same:.2f} images/s; ours/that "
                  f"{max(runs.values()) / same:.2f}x", flush=True)  # fmt: skip
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
