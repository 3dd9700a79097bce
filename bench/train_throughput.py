"""Ray Train + DeepSpeed pretraining step vs a bare single-process transformers step.

Same machine cores and the same global batch. Two one-process references (torch threads =
all cores, torch AdamW + clipping at 3.0), each timed before and after ours because the host
drifts:
- "transformers": the step a user writes, ``BeitForMaskedImageModeling(pixel_values,
  bool_masked_pos=, labels=)`` — the issue's baseline;
- "fused": the same loop on our ``mim_forward`` (the model code our workers run), so the
  ratio against it is the cost of Ray Train + Ray Data + DeepSpeed alone.
Ours is the whole path (Ray Data shard → iter_torch_batches → DeepSpeed engine) with N
workers × (cores / N) threads. Prints images/s, both ratios, and our data-wait fraction at
steady state (from metrics.jsonl, first log interval dropped).

    python bench/train_throughput.py --flavour base --image-size 96 --batch 16 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch


def rows(n: int, image: int, patch: int, vocab: int) -> list[dict]:
    rng = np.random.default_rng(0)
    g = (image // patch) ** 2
    k = round(0.3827 * g)  # what the data masks (data.num_masking_patches unset): 75 of 196
    return [
        {
            "pixel_values": rng.integers(0, 255, (3, image, image), dtype=np.uint8),
            "bool_masked_pos": rng.permutation(g) < k,
            "visual_token_ids": rng.integers(0, vocab, g).astype(np.int16),
        }
        for _ in range(n)
    ]


def baseline(args: argparse.Namespace, data: list[dict], fused: bool) -> float:
    """One process, all cores, torch AdamW: transformers' own forward, or our ``mim_forward``."""
    from beit_ray.models.build import build_model
    from beit_ray.models.mim import mim_forward

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build_model(args.flavour, "mim", image_size=args.image_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def batch(i: int) -> tuple[torch.Tensor, ...]:
        rs = [data[(i * args.batch + j) % len(data)] for j in range(args.batch)]
        x = (
            torch.from_numpy(np.stack([r["pixel_values"] for r in rs]))
            .float()
            .sub_(127.5)
            .div_(127.5)
        )
        m = torch.from_numpy(np.stack([r["bool_masked_pos"] for r in rs]))
        t = torch.from_numpy(np.stack([r["visual_token_ids"] for r in rs]).astype(np.int64))
        return x, m, t

    def step(i: int) -> None:
        x, m, t = batch(i)
        if fused:
            loss, _, _ = mim_forward(model, x, m, t)
        else:
            loss = model(x, bool_masked_pos=m, labels=t[m]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()

    for i in range(args.warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    return args.steps * args.batch / (time.perf_counter() - t0)


def ours(args: argparse.Namespace, data: list[dict]) -> tuple[float, float, float]:
    import ray

    from beit_ray.config import RayConfig, build
    from beit_ray.runtime import init_ray
    from beit_ray.train.config import PretrainConfig
    from beit_ray.train.data import TrainData
    from beit_ray.train.trainer import run_pretraining

    tmp = tempfile.mkdtemp(prefix="bench_train_")
    # As the job starts it: a local Ray; each worker takes its share of the cores as threads.
    init_ray(RayConfig())
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = build(
        PretrainConfig,
        {
            "model": {"flavour": args.flavour, "image_size": args.image_size},
            "data": {"source": "unused", "tokenizer": "none"},
            "scaling": {"num_workers": args.workers, "cpus_per_worker": 0.5},
            "deepspeed": {
                "zero_stage": args.zero,
                "micro_batch_size": args.batch // args.workers,
                **(
                    {}
                    if args.mmap_threshold is None
                    else {"malloc_mmap_threshold": args.mmap_threshold}
                ),
            },
            "run": {"max_steps": args.warmup + args.steps, "log_every": args.warmup},
            "optim": {"lr": 1e-4},
            "checkpoint": {"storage_path": tmp, "name": "bench"},
        },
    )
    result = run_pretraining(cfg, TrainData({"train": ray.data.from_items(data)}, passes=1))
    with open(os.path.join(result.logs_uri, "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f if '"train"' in x][1:]  # first interval: warm-up
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)  # the run's checkpoints: GBs for BEiT-base
    return (
        float(np.mean([r["images_per_s"] for r in recs])),
        float(np.mean([r["data_wait_frac"] for r in recs])),
        max(r["peak_rss_gb"] for r in recs),
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--flavour", default="base")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=1, help="our runs, each between references")
    p.add_argument(
        "--mmap-threshold", type=int, default=None, help="deepspeed.malloc_mmap_threshold"
    )
    args = p.parse_args()
    from beit_ray.models.flavours import get_flavour

    f = get_flavour(args.flavour)
    data = rows(max(256, args.batch * 8), args.image_size, f.patch_size, f.vocab_size)
    refs = {"transformers": False, "fused": True}

    def references() -> dict[str, float]:
        out = {name: baseline(args, data, fused) for name, fused in refs.items()}
        print("  ".join(f"{n} step (1 process, {os.cpu_count()} threads): {v:.2f} images/s"
                        for n, v in out.items()), flush=True)  # fmt: skip
        return out

    # B0 O1 B1 O2 B2 ...: each of our runs is compared with the references just before and
    # just after it, so the host's drift (and a neighbour's burst) hits both sides alike.
    refs_seen = [references()]
    ratios: dict[str, list[float]] = {name: [] for name in refs}
    for _ in range(args.repeats):
        ips, wait, rss = ours(args, data)
        print(f"ray train + deepspeed ZeRO-{args.zero} ({args.workers} workers): {ips:.2f} "
              f"images/s, data-wait {wait:.1%}, rank-0 peak RSS {rss:.2f} GiB", flush=True)  # fmt: skip
        refs_seen.append(references())
        for name in refs:
            ratios[name].append(ips / ((refs_seen[-2][name] + refs_seen[-1][name]) / 2))
        print("  ".join(f"ours / {n}: {r[-1]:.3f}" for n, r in ratios.items()), flush=True)
    print("median over runs: " + "  ".join(
        f"ours / {n}: {float(np.median(r)):.3f}" for n, r in ratios.items()))  # fmt: skip
    print(f"target: ours / transformers >= 0.9; data-wait {wait:.1%} (target < 5%)")


if __name__ == "__main__":
    sys.exit(main())
