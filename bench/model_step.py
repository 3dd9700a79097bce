"""BEiT MIM training step: our mim_forward (fused encoder + masked-only head) vs transformers'.

Both run forward + backward on the same model, batch (75 of 196 patches masked per image, as
BEiT), threads and drop-path draws, interleaved iteration by iteration with alternating order so
machine noise hits both alike. The GEMM roof (fp32 torch.matmul FLOP/s, best of the model's MLP
shape [B*197, 768] x [768, 3072] and a 2048^3 square) is measured inside every iteration too, and
each step's fraction of the roof uses its own iteration's roof, so load drift cancels. FLOPs are
counted with torch.utils.flop_counter.FlopCounterMode. ``--profile`` adds one profiled step of
each: GEMM vs other self CPU time by operator.

    .venv/bin/python bench/model_step.py --flavour base --batch 8 --iters 5 --profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from beit_ray.models.build import build_model
from beit_ray.models.mim import mim_forward

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution")
GEMM_OPS += ("aten::convolution_backward",)


def _inputs(batch: int, size: int, patch: int, vocab: int, masked: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = (size // patch) ** 2
    pixels = torch.randn(batch, 3, size, size, generator=g)
    scores = torch.rand(batch, n, generator=g)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, scores.topk(masked, dim=1).indices, True)  # exactly `masked` per image
    tokens = torch.randint(0, vocab, (batch, n), generator=g)
    return pixels, mask, tokens


def ours(model, pixels, mask, tokens) -> torch.Tensor:
    loss, _, _ = mim_forward(model, pixels, mask, tokens)
    loss.backward()
    return loss.detach()


def plain(model, pixels, mask, tokens) -> torch.Tensor:
    loss = model(pixels, bool_masked_pos=mask, labels=tokens[mask]).loss
    loss.backward()
    return loss.detach()


def flops(step: Callable, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        step(*args)
    return counter.get_total_flops()


def gemm_rate(m: int, k: int, n: int, seconds: float) -> tuple[float, float]:
    """fp32 matmul FLOP per wall second and per CPU second of this process over ~``seconds``."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    work = 2 * m * k * n * count
    return work / (time.perf_counter() - start), work / (time.process_time() - cpu)


def gemm_split(step: Callable, *args) -> tuple[float, float, list[tuple[str, float]]]:
    """(GEMM self CPU s, other self CPU s, top non-GEMM ops) of one profiled step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(*args)
    gemm, other = 0.0, []
    for e in prof.key_averages():
        if e.key in GEMM_OPS:
            gemm += e.self_cpu_time_total / 1e6
        elif e.key.startswith("aten::"):
            other.append((e.key, e.self_cpu_time_total / 1e6))
    other.sort(key=lambda kv: -kv[1])
    return gemm, sum(s for _, s in other), other[:6]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavour", default="base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--masked", type=int, default=75, help="masked patches per image")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--roof-seconds", type=float, default=0.5)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    model = build_model(args.flavour, "mim").train()
    cfg = model.config
    pixels, mask, tokens = _inputs(
        args.batch, cfg.image_size, cfg.patch_size, cfg.vocab_size, args.masked, 0
    )
    batch = (model, pixels, mask, tokens)
    steps = {"ours (mim_forward)": ours, "transformers (labels=)": plain}
    work = {name: flops(step, *batch) for name, step in steps.items()}
    model.zero_grad(set_to_none=True)

    # Same seed -> same drop-path draws: the two losses must agree.
    losses, grads = {}, {}
    for name, step in steps.items():
        torch.manual_seed(1)
        losses[name] = step(*batch).item()
        grads[name] = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                for p in model.parameters()
            ]
        )
        model.zero_grad(set_to_none=True)
    a_loss, b_loss = losses.values()
    g_a, g_b = grads.values()
    grad_rel = ((g_a - g_b).norm() / g_b.norm()).item()

    tokens_per_batch = args.batch * ((cfg.image_size // cfg.patch_size) ** 2 + 1)
    shapes = [(tokens_per_batch, cfg.hidden_size, cfg.intermediate_size), (2048, 2048, 2048)]
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu_times: dict[str, list[float]] = {name: [] for name in steps}
    fraction: dict[str, list[float]] = {name: [] for name in steps}
    cpu_fraction: dict[str, list[float]] = {name: [] for name in steps}
    roofs: list[tuple[float, float]] = []
    order = list(steps.items())
    for i in range(args.warmup + args.iters):
        rates = [gemm_rate(*s, args.roof_seconds) for s in shapes]
        roof, cpu_roof = max(r[0] for r in rates), max(r[1] for r in rates)
        for name, step in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            start, cpu = time.perf_counter(), time.process_time()
            step(*batch)
            elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu
            model.zero_grad(set_to_none=True)
            if i >= args.warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu_elapsed)
                fraction[name].append(work[name] / elapsed / roof)
                cpu_fraction[name].append(work[name] / cpu_elapsed / cpu_roof)
        if i >= args.warmup:
            roofs.append((roof, cpu_roof))

    print(
        f"load average (1 min): {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
        f"on {os.cpu_count()} CPUs"
    )
    print(
        f"{args.flavour} MIM fwd+bwd, batch {args.batch}, {args.masked} masked per image, "
        f"{torch.get_num_threads()} threads, {args.iters} iters (+{args.warmup} warmup)"
    )
    print(
        f"loss ours {a_loss:.6f} vs transformers {b_loss:.6f} "
        f"(rel diff {abs(a_loss - b_loss) / abs(b_loss):.1e}); gradient rel diff {grad_rel:.1e}"
    )
    print(
        "fp32 GEMM roof per iteration, GFLOP per wall s / per CPU s: "
        + ", ".join(f"{w / 1e9:.0f}/{c / 1e9:.0f}" for w, c in roofs)
    )
    rate = {}
    for name in steps:
        t = statistics.median(times[name])
        rate[name] = args.batch / t
        print(
            f"{name:24s} {rate[name]:6.2f} img/s  {t:6.2f} s/step (median; all: "
            f"{', '.join(f'{x:.2f}' for x in times[name])})  {work[name] / 1e9:6.1f} GFLOP/step  "
            f"{work[name] / t / 1e9:6.1f} GFLOP/s = {statistics.median(fraction[name]):.2f} "
            f"of roof (median of per-iteration fractions)"
        )
        c = statistics.median(cpu_times[name])
        print(
            f"{'':24s} CPU time {c:6.2f} CPU-s/step (all: "
            f"{', '.join(f'{x:.2f}' for x in cpu_times[name])})  "
            f"{work[name] / c / 1e9:6.1f} GFLOP per CPU-s = "
            f"{statistics.median(cpu_fraction[name]):.2f} of the per-CPU-s roof"
        )
    ratios = [a / b for a, b in zip(*(times[n] for n in steps), strict=True)]
    print(
        f"speed-up ours / transformers: {rate['ours (mim_forward)'] / rate['transformers (labels=)']:.3f}x "
        f"(median times); per iteration pair: {', '.join(f'{1 / r:.2f}' for r in ratios)}"
    )
    a_cpu, b_cpu = (statistics.median(cpu_times[n]) for n in steps)
    print(f"speed-up in CPU time per step: {b_cpu / a_cpu:.3f}x")
    if args.profile:
        for name, step in steps.items():
            gemm, other, top = gemm_split(step, *batch)
            model.zero_grad(set_to_none=True)
            print(
                f"profile {name}: GEMM {gemm:.2f} s, other {other:.2f} s self CPU "
                f"({other / (gemm + other):.0%} outside GEMMs); top: "
                + ", ".join(f"{k.removeprefix('aten::')} {s:.2f}" for k, s in top)
            )


if __name__ == "__main__":
    main()
