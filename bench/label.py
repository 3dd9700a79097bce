"""Batch labelling throughput: jobs/label.py's path vs the loop a user would write.

    .venv/bin/python bench/label.py --images 200 [--flavour base]

Baseline: transformers ``pipeline("image-classification", model=DIR)`` called on the files one
at a time (the same exported checkpoint, same images, same machine, same run). Ours:
``beit_ray.infer.label.label`` (Ray Data: read + decode tasks → predictor actor pool → parquet)
with 1 actor (all cores) and with 2 actors (half the cores each), for each ``--dtypes`` value
(``predict.dtype``); the user's loop is timed in each dtype too, so every ratio has a like-for-
like partner. Ours is reported twice: end to end (submission to the last part written: worker
and actor start-up and the model load included, Ray's own start-up excluded) and after the first
result (the model loaded, as the baseline's clock starts after ``pipeline()`` has loaded it and
warmed up): what a long job converges to.
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
    summary = label(cfg)
    return summary["images_per_s"], summary["images_per_s_after_first"]


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

    # The user's loop in each dtype (model loaded and warmed up before the clock starts).
    loops = {dtype: baseline(ckpt, paths, dtype) for dtype in args.dtypes.split(",")}
    base = loops.get("float32") or baseline(ckpt, paths)
    for dtype, rate in loops.items():
        print(f"baseline pipeline() one at a time, {dtype}: {rate:.2f} images/s", flush=True)
    t = time.perf_counter()
    init_ray(RayConfig(num_cpus=4))  # as jobs/label.py starts it
    print(f"ray start-up: {time.perf_counter() - t:.1f} s (not counted below)")
    print(
        "ours: end to end (from submission, actor start-up and model load included) and after\n"
        "the first result (model loaded, as the baseline's clock); ratios to the user's loop in\n"
        "the same dtype (like for like) and to the float32 loop"
    )
    half = max(1, cores // 2)
    for dtype in args.dtypes.split(","):
        runs = {}
        # One actor on all cores, then scaling: 1 → 2 actors of the same size (half the cores).
        for actors, threads in ((1, cores), (1, half), (2, half)):
            out = os.path.join(root, f"out-{dtype}-{actors}x{threads}")
            ips, steady = ours(ckpt, folder, out, actors, threads, args.batch, dtype)
            runs[(actors, threads)] = (ips, steady)
            print(
                f"ours {dtype}, {actors} actor(s) x {threads} threads: end to end {ips:.2f} "
                f"images/s = {ips / loops[dtype]:.2f}x same dtype, {ips / base:.2f}x float32; "
                f"after the first result {steady:.2f} = {steady / loops[dtype]:.2f}x same dtype, "
                f"{steady / base:.2f}x float32",
                flush=True,
            )
        one, two = runs[(1, half)], runs[(2, half)]
        print(f"ours {dtype}: 1 -> 2 actors of {half} thread(s): end to end {two[0] / one[0]:.2f}x, "
              f"after the first result {two[1] / one[1]:.2f}x", flush=True)  # fmt: skip
    ray.shutdown()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
