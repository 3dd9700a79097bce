"""Per-core CPU rates the feed model (beit_ray/feed.py) plans with, each against a baseline
measured in the same run on the same core.

    .venv/bin/python bench/feed_rates.py [--images 192] [--repeats 3] [--json feed_rates.json]

One process, one torch thread (a core). Every figure is paired with its baseline: each repeat
runs the baseline and the workload back to back, and the best repeat of each is kept (load on
a shared machine only ever slows things down).

1. decode + augment + mask: the batch function Ray Data's decode tasks run
   (``pipeline.pretrain_batch``: read, crop-only JPEG decode, patch and tokenizer views, block
   mask) on ImageNet-sized JPEGs (bench/data_pipeline.py's set) in images/s, against the
   decode floor (a full Pillow decode to RGB of the same files).
2. the CPU tokenizers through ``load_tokenizer`` (the actors' code path): the DALL-E encoder
   (full shape, random weights, 112 px, batch 4) and an 8192-code codebook (batch 64, the
   pipeline's), in images/s and FLOP/s, the FLOPs counted by ``beit_ray.feed`` from the shapes;
   baseline: this core's fp32 GEMM rate (``torch.matmul`` 1024³), so each figure is also a
   fraction of the core's roof (which carries over to other CPUs better than images/s).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data_pipeline import make_images, ours_batch_rate  # noqa: E402

from beit_ray import feed  # noqa: E402
from beit_ray.data.config import DataConfig  # noqa: E402


def seconds(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def paired(
    base: Callable[[], object], work: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """(best seconds of ``base``, best seconds of ``work``), run back to back ``repeats`` times."""
    b = w = math.inf
    for _ in range(repeats):
        b = min(b, seconds(base))
        w = min(w, seconds(work))
    return b, w


def gemm(n: int = 1024, iters: int = 3) -> tuple[Callable[[], object], float]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda: [a @ b for _ in range(iters)]), 2.0 * n**3 * iters


def tokenizer_fn(kind: str, batch: int, tmp: str) -> tuple[Callable[[], object], float]:
    from safetensors.torch import save_file

    from beit_ray.data.tokenizers import load_tokenizer

    path = os.path.join(tmp, f"{kind}.safetensors")
    if kind == "dalle":
        from beit_ray.data.tokenizers.dalle import DalleEncoder

        enc = DalleEncoder()
        save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, path)
        flops = feed.dalle_flops(112)
    else:
        from beit_ray.data.tokenizers.codebook import Codebook

        g = torch.Generator().manual_seed(0)
        Codebook(torch.randn(8192, 3 * 64 + 3, generator=g), 14).save(path)
        flops = feed.codebook_flops(112, 14, 8192)
    tok = load_tokenizer(kind, path, device="cpu")
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (batch, 3, 112, 112), generator=g, dtype=torch.uint8).numpy()
    return (lambda: tok(pixels)), flops * batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dalle-batch", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    out: dict[str, dict[str, float]] = {}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench_feed_") as tmp:
        root = os.path.join(tmp, "images")
        paths = make_images(root, a.images)
        cfg = DataConfig(source=root, tokenizer="none", color_jitter=0.0)

        ours_batch_rate(paths[:32], root, cfg)  # warm: compiles the crop decoder once
        # Paired per 32-image chunk (as bench/data_pipeline.py): a load spike hits one chunk.
        b = w = 0.0
        for c in range(0, len(paths), 32):
            chunk = paths[c : c + 32]
            cb, cw = paired(
                lambda: [Image.open(p).convert("RGB") for p in chunk],  # noqa: B023
                lambda: ours_batch_rate(chunk, root, cfg),  # noqa: B023
                a.repeats,
            )
            b, w = b + cb, w + cw
        out["decode"] = {"images_per_s": len(paths) / w, "floor_images_per_s": len(paths) / b}
        print(
            f"decode+augment+mask per core {len(paths) / w:8.1f} images/s   "
            f"decode floor {len(paths) / b:8.1f} images/s   = {b / w:.2f}x the floor",
            flush=True,
        )
        loads.append(os.getloadavg()[0])
        roof_fn, roof_flops = gemm()
        roof_fn()
        for name, (fn, flops) in {
            "dalle": tokenizer_fn("dalle", a.dalle_batch, tmp),
            "codebook": tokenizer_fn("codebook", 64, tmp),
        }.items():
            fn()  # warm
            b, w = paired(roof_fn, fn, a.repeats)
            images = a.dalle_batch if name == "dalle" else 64
            roof, rate = roof_flops / b, flops / w
            out[name] = {
                "images_per_s": images / w,
                "gflops_per_s": rate / 1e9,
                "roof_gflops_per_s": roof / 1e9,
                "fraction_of_roof": rate / roof,
            }
            print(
                f"{name:<9} per core {images / w:10.2f} images/s, {rate / 1e9:6.1f} GFLOP/s "
                f"({flops / images / 1e9:.3g} GFLOP/image)   fp32 GEMM roof {roof / 1e9:6.1f} "
                f"GFLOP/s   = {rate / roof:.2f} of the roof",
                flush=True,
            )
            loads.append(os.getloadavg()[0])
    out["load_average"] = {"min": min(loads), "max": max(loads)}
    print(f"load average {min(loads):.1f}-{max(loads):.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
