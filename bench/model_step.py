"""BEiT MIM training step: our masked-only head (mim_forward) vs transformers' own step.

Both run forward + backward on the same model, batch and threads, interleaved iteration by
iteration so machine noise hits both alike. The roof is torch.matmul fp32 FLOP/s measured in
the same run on a GEMM of the model's own shape ([B*197, 768] x [768, 3072]); model FLOPs are
counted with torch.utils.flop_counter.FlopCounterMode.

    .venv/bin/python bench/model_step.py --flavour base --batch 8 --iters 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from beit_ray.models.build import build_model
from beit_ray.models.mim import mim_forward


def _inputs(batch: int, size: int, patch: int, vocab: int, ratio: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = (size // patch) ** 2
    pixels = torch.randn(batch, 3, size, size, generator=g)
    scores = torch.rand(batch, n, generator=g)
    k = int(round(ratio * n))
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, scores.topk(k, dim=1).indices, True)  # exactly k masked patches per image
    tokens = torch.randint(0, vocab, (batch, n), generator=g)
    return pixels, mask, tokens


def ours(model, pixels, mask, tokens) -> None:
    loss, _, _ = mim_forward(model, pixels, mask, tokens)
    loss.backward()


def plain(model, pixels, mask, tokens) -> None:
    model(pixels, bool_masked_pos=mask, labels=tokens[mask]).loss.backward()


def flops(step, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        step(*args)
    return counter.get_total_flops()


def gemm_roof(m: int, k: int, n: int, seconds: float = 3.0) -> tuple[float, float]:
    """fp32 matmul FLOP per wall second and per CPU second of this process."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    work = 2 * m * k * n * count
    return work / (time.perf_counter() - start), work / (time.process_time() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavour", default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mask-ratio", type=float, default=0.4)
    args = ap.parse_args()

    model = build_model(args.flavour, "mim").train()
    cfg = model.config
    pixels, mask, tokens = _inputs(
        args.batch, cfg.image_size, cfg.patch_size, cfg.vocab_size, args.mask_ratio, 0
    )
    batch = (model, pixels, mask, tokens)
    steps = {"ours (mim_forward)": ours, "transformers (labels=)": plain}
    work = {name: flops(step, *batch) for name, step in steps.items()}
    model.zero_grad(set_to_none=True)

    tokens_per_batch = args.batch * ((cfg.image_size // cfg.patch_size) ** 2 + 1)
    shape = (tokens_per_batch, cfg.hidden_size, cfg.intermediate_size)
    roofs = [gemm_roof(*shape)]
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps.items())
    for i in range(args.warmup + args.iters):
        for name, step in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            start, cpu = time.perf_counter(), time.process_time()
            step(*batch)
            elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu
            model.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu_elapsed)
    roofs.append(gemm_roof(*shape))
    roof = max(r[0] for r in roofs)  # the less disturbed of the two measurements
    cpu_roof = max(r[1] for r in roofs)
    print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(
        f"{args.flavour} MIM fwd+bwd, batch {args.batch}, {torch.get_num_threads()} threads, {args.iters} iters"
    )
    print(
        f"fp32 GEMM roof ({shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}), before / after the steps: "
        + ", ".join(f"{w / 1e9:.1f} GFLOP/s ({c / 1e9:.1f} per CPU-s)" for w, c in roofs)
    )
    rate = {}
    for name in steps:
        t = statistics.median(times[name])
        rate[name] = args.batch / t
        achieved = work[name] / t
        print(
            f"{name:24s} {rate[name]:6.2f} img/s  {t:6.2f} s/step (median; all: "
            f"{', '.join(f'{x:.2f}' for x in times[name])})  {work[name] / 1e9:7.1f} GFLOP/step  "
            f"{achieved / 1e9:6.1f} GFLOP/s = {achieved / roof:.2f} of roof"
        )
        cpu_t = statistics.median(cpu_times[name])
        per_cpu = work[name] / cpu_t
        print(
            f"{'':24s} CPU time: {cpu_t:6.2f} CPU-s/step, {per_cpu / 1e9:.1f} GFLOP per CPU-s = {per_cpu / cpu_roof:.2f} of roof"
        )
    a, b = rate["ours (mim_forward)"], rate["transformers (labels=)"]
    c = statistics.median(cpu_times["transformers (labels=)"]) / statistics.median(
        cpu_times["ours (mim_forward)"]
    )
    print(f"speed-up ours / transformers: {a / b:.3f}x wall, {c:.3f}x CPU time")


if __name__ == "__main__":
    main()
