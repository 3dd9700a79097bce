"""Peak memory per worker: ZeRO-3 against ZeRO-0 (plain data parallel), BEiT-large, 2 workers.

Both runs take the same few MIM steps on tiny inputs (memory is dominated by parameters,
gradients and AdamW states, not activations); the peak resident set of rank 0's worker comes
from metrics.jsonl: ``ru_maxrss`` of the worker process, so it includes startup (model build,
engine init) as well as the steps. Target: ZeRO-3 ≤ 0.6 × ZeRO-0.

    python bench/train_memory.py --flavour large --steps 2
    python bench/train_memory.py --stages 3 --mmap-threshold 0   # ablation: glibc's default
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np


def peak_rss(flavour: str, zero: int, steps: int, image: int, ds_extra: dict) -> float:
    import ray

    from beit_ray.config import build
    from beit_ray.models.flavours import get_flavour
    from beit_ray.train.config import PretrainConfig
    from beit_ray.train.data import TrainData
    from beit_ray.train.trainer import run_pretraining

    f = get_flavour(flavour)
    g = (image // f.patch_size) ** 2
    rng = np.random.default_rng(0)
    rows = [
        {
            "pixel_values": rng.integers(0, 255, (3, image, image), dtype=np.uint8),
            "bool_masked_pos": rng.random(g) < 0.5,
            "visual_token_ids": rng.integers(0, f.vocab_size, g).astype(np.int16),
        }
        for _ in range(16)
    ]
    tmp = tempfile.mkdtemp(prefix="bench_mem_")
    cfg = build(
        PretrainConfig,
        {
            "model": {"flavour": flavour, "image_size": image},
            "data": {"source": "unused", "tokenizer": "none"},
            "deepspeed": {"zero_stage": zero, "micro_batch_size": 1, **ds_extra},
            "run": {"max_steps": steps, "log_every": 1},
            "optim": {"lr": 1e-4},
            "checkpoint": {"storage_path": tmp, "name": f"zero{zero}"},
        },
    )
    result = run_pretraining(cfg, TrainData({"train": ray.data.from_items(rows)}, passes=1))
    with open(os.path.join(result.logs_uri, "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f]
    shutil.rmtree(tmp, ignore_errors=True)  # checkpoints of BEiT-large: GBs per run
    return max(r["peak_rss_gb"] for r in recs if r["kind"] == "train")


def main() -> None:
    import ray

    p = argparse.ArgumentParser()
    p.add_argument("--flavour", default="large")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 3], help="ZeRO stages, run in turn")
    p.add_argument(
        "--mmap-threshold", type=int, default=None, help="deepspeed.malloc_mmap_threshold"
    )
    p.add_argument("--bucket-size", type=int, default=None, help="deepspeed.bucket_size")
    args = p.parse_args()
    ds_extra = {
        k: v
        for k, v in (
            ("malloc_mmap_threshold", args.mmap_threshold),
            ("bucket_size", args.bucket_size),
        )
        if v is not None
    }
    from beit_ray.config import RayConfig
    from beit_ray.runtime import init_ray

    init_ray(RayConfig(num_cpus=4))  # as the jobs start it
    ray.data.DataContext.get_current().enable_progress_bars = False
    peaks = {}
    for zero in args.stages:
        peaks[zero] = peak_rss(args.flavour, zero, args.steps, args.image_size, ds_extra)
        print(f"ZeRO-{zero}: rank-0 worker peak RSS {peaks[zero]:.2f} GiB", flush=True)
    if 0 in peaks and 3 in peaks:
        print(f"ratio ZeRO-3 / ZeRO-0: {peaks[3] / peaks[0]:.3f} (target <= 0.6)")
    ray.shutdown()


if __name__ == "__main__":
    main()
