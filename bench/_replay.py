"""The fixed-order comparison's data side (bench only): what a job run trained on, step by step,
read back from its ``--debug.record_rows`` files, and how random such an order is against a
plain per-epoch permutation. Used by ``bench/learning.py --replay`` and ``--order-stats``."""

from __future__ import annotations

import glob
import json
import os
import statistics

import torch
from _digits import folder_files


def job_order(run: str, train: str, rows: str) -> list[tuple[int, list[int], list[bool]]]:
    """What a job run trained on, step by step, from its ``--debug.record_rows`` files:
    (epoch, indices into :func:`load_folder` (``train``)'s order, the job's flip of each),
    rank 0's rows first. The recorded (epoch, pos, idx) are mapped to images through the
    library's own plan (the run's listing, ``epoch_groups``, ``read_group``) and flips through
    its own draw (``image_rng`` → ``draw_flip``), as the job's read tasks and transform did."""
    from beit_ray.config import build, load_yaml
    from beit_ray.data.augment import draw_flip, image_rng
    from beit_ray.data.listing import list_parts
    from beit_ray.data.plan import epoch_groups, read_group
    from beit_ray.train.config import FinetuneConfig

    cfg = build(FinetuneConfig, load_yaml(os.path.join(run, "config.yaml")))
    d = cfg.data
    listing = list_parts(d, None, uri=os.path.join(run, "listing"))
    where = {rel: i for i, (rel, _) in enumerate(folder_files(train)[0])}
    groups: dict[tuple[int, int], list[dict]] = {}
    steps: dict[int, list[tuple[int, int, bool]]] = {}
    for rank in range(cfg.scaling.num_workers):
        with open(os.path.join(rows, f"rows-rank{rank}.jsonl")) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        # A restarted attempt resumes from a checkpoint and trains its steps again: per step,
        # the rows of the last attempt that trained it are the ones the final model saw.
        last = {r["step"]: r["pid"] for r in lines}
        for r in (r for r in lines if last[r["step"]] == r["pid"]):
            e = r["epoch"]
            for pos, idx in zip(r["pos"], r["idx"], strict=True):
                if (e, pos) not in groups:
                    g = epoch_groups(listing, d, None, e, True)[pos]
                    groups[(e, pos)] = list(read_group(g, listing, d, None, {}, None))
                row = groups[(e, pos)][idx]
                flip = draw_flip(image_rng(d.seed, e, str(row["key"])), d.flip)
                rel = os.path.relpath(row["path"], train)
                steps.setdefault(r["step"], []).append((e, where[rel], bool(flip)))
    out = []
    for k in sorted(steps):
        (e,) = {e for e, _, _ in steps[k]}
        out.append((e, [i for _, i, _ in steps[k]], [f for _, _, f in steps[k]]))
    return out


def loop_epoch(
    gen: torch.Generator, n: int, batch: int, p_flip: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The plain loop's own epoch over ``n`` images: one permutation, then each step's
    (indices [batch], flips [batch] bool), drawn from ``gen`` in this order."""
    perm = torch.randperm(n, generator=gen)
    out = []
    for b in range(n // batch):
        i = perm[b * batch : (b + 1) * batch]
        out.append((i, torch.rand(len(i), generator=gen) < p_flip))
    return out


def order_stats(steps: list[list[int]], n: int) -> dict[str, float]:
    """How random an order is: how often each of the ``n`` images is trained on, and how often
    each pair shares a step (a shuffle that mixes poorly shows as a wider pair spread)."""
    seen = [0] * n
    pairs: dict[tuple[int, int], int] = {}
    for ix in steps:
        for i in ix:
            seen[i] += 1
        s = sorted(ix)
        for a, i in enumerate(s):
            for j in s[a + 1 :]:
                pairs[(i, j)] = pairs.get((i, j), 0) + 1
    together = list(pairs.values()) + [0] * (n * (n - 1) // 2 - len(pairs))
    return {"seen_sd": statistics.stdev(seen), "seen_min": min(seen), "seen_max": max(seen),
            "pair_sd": statistics.stdev(together), "pair_max": max(together)}  # fmt: skip


def print_order_stats(out: str) -> None:
    """``--order-stats``: the job orders recorded by a ``--replay`` run in ``out`` against the
    plain loop's own per-epoch permutations (same steps, same batch), per seed."""
    few = os.path.join(out, "digits", "few")
    n = sum(len(f) for _, _, f in os.walk(few))
    print(
        "| order | seed | times seen: sd (min-max) | pairs in one step: sd (max) |\n|---|---|---|---|"
    )
    for rows in sorted(glob.glob(os.path.join(out, "rows", "few-*"))):
        name = os.path.basename(rows)
        seed = int(name.rsplit("-s", 1)[1])
        order = job_order(os.path.join(out, "runs", name), few, rows)
        batch, epochs = len(order[0][1]), len({e for e, _, _ in order})
        gen = torch.Generator().manual_seed(seed)  # as reference() seeds its order
        own = [i.tolist() for _ in range(epochs) for i, _ in loop_epoch(gen, n, batch, 0.5)]
        for label, steps in (("job", [ix for _, ix, _ in order]), ("plain loop", own)):
            st = order_stats(steps, n)
            print(f"| {label} | {seed} | {st['seen_sd']:.2f} ({st['seen_min']}-{st['seen_max']}) "
                  f"| {st['pair_sd']:.3f} ({st['pair_max']}) |")  # fmt: skip
