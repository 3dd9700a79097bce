"""Does the data feed keep up with the training GPUs? Work per image, rates, and a verdict.

    f = feed.estimate(cfg, gpus=16)     # cfg: a PretrainConfig; gpus: the cluster's, if known
    f.train_rate, f.decode_cores, f.actors_needed, f.verdict

Work per image is counted from the shapes (the MIM train step, the DALL-E encoder, the
codebook), as ``torch.utils.flop_counter.FlopCounterMode`` counts the real modules
(tests/test_feed.py holds the two together). A GPU's images/s is an assumed fraction of its
dense bf16 peak; a CPU core's are measured by ``bench/feed_rates.py`` (bench/RESULTS.md, "feed
rates"). Imports nothing but the standard library and the config modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GPU_BF16_TFLOPS: dict[str, float] = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "A10G": 70.0,
    "L4": 121.0,
}
"""Dense (no sparsity) bf16/fp16 tensor-core peak per card, from NVIDIA's data sheets (H100 and
H200: SXM; A100: SXM or PCIe; L4: 242 with sparsity). The A10G is AWS's part (g5), for which
NVIDIA publishes no sheet: the 70 usually quoted for it (the A10 is 125)."""

GPU_EFFICIENCY = 0.4
"""ASSUMED, not measured here (no GPU): the fraction of that peak a BEiT MIM step and the DALL-E
encoder (fp16 autocast) reach. Optimistic for the step, so the feed is sized for a fast one;
``bench/gpu_check.py`` measures both on a real card."""

UNKNOWN_GPU = "H100"
"""The card a plan sizes the feed for when ``scaling.gpu_kind`` is unset: the fastest known."""

# Measured on one core of this project's 2-core AVX2 VM by bench/feed_rates.py, three runs at
# load averages 2-39 (bench/RESULTS.md, "feed rates", 2026-12-07), rounded down to the slower
# runs: cluster cores (AVX-512, not shared) are faster, so these err towards more CPUs.
CPU_DECODE_IMAGES_PER_CORE = 500.0
"""read + crop-only JPEG decode + two views + block mask (``pipeline.pretrain_batch``) of ~500×375
JPEGs: 421-519 images/s measured (590-607 in bench/data_pipeline.py on a quiet machine), 0.66-0.69
of a full Pillow decode of the same files in the same runs."""
CPU_GFLOPS_PER_CORE: dict[str, float] = {"dalle": 50.0, "codebook": 25.0}
"""Achieved fp32 GFLOP/s of one core in a CPU tokenizer actor: DALL-E 49-63 measured (~1 image/s,
0.66-0.70 of the core's GEMM rate), the 8192-code codebook 25-31 (~40-50 images/s, 0.32-0.39)."""
CPU_TOKENIZER_CORES_PER_GPU = 16
"""CPU tokenizing that needs more cores than this per training GPU (a GPU node has 12-24 per
GPU) is no plan: the verdict is GPU actors or shards."""


# --------------------------------------------------------------------------- work per image


def mim_step_flops(
    flavour: str, image_size: int | None = None, masked: int | None = None, vocab: int | None = None
) -> float:
    """FLOPs of one image's MIM train step (forward + backward of ``models.mim.mim_forward``).

    The last block computes its output projection and MLP for the masked rows only, the head
    runs on masked patches only, and the patch embedding needs no input gradient.
    """
    from beit_ray.models.flavours import get_flavour

    f = get_flavour(flavour)
    d, mlp, depth = f.hidden_size, f.mlp, f.depth
    n = ((image_size or f.image_size) // f.patch_size) ** 2
    t = n + 1
    m = round(0.3827 * n) if masked is None else masked
    patch = 2.0 * n * 3 * f.patch_size**2 * d
    block = 2.0 * t * (4 * d * d + 2 * d * mlp) + 4.0 * t * t * d
    last = 2.0 * t * 3 * d * d + 4.0 * t * t * d + 2.0 * m * (d * d + 2 * d * mlp)
    head = 2.0 * m * d * (vocab or f.vocab_size)
    forward = patch + (depth - 1) * block + last + head
    return 3.0 * forward - patch


def dalle_flops(
    view: int = 112, n_hid: int = 256, groups: int = 4, blocks: int = 2, vocab: int = 8192
) -> float:
    """FLOPs of the DALL-E encoder (``data.tokenizers.dalle.DalleEncoder``) on one view."""

    def conv(size: int, k: int, cin: int, cout: int) -> float:
        return 2.0 * size * size * k * k * cin * cout

    total = conv(view, 7, 3, n_hid)
    n_in, size = n_hid, view
    for g in range(groups):
        width, hid = n_hid * 2**g, n_hid * 2**g // 4
        for _ in range(blocks):
            if n_in != width:
                total += conv(size, 1, n_in, width)
            total += (
                conv(size, 3, n_in, hid) + 2 * conv(size, 3, hid, hid) + conv(size, 1, hid, width)
            )
            n_in = width
        if g < groups - 1:
            size //= 2
    return total + conv(size, 1, n_in, vocab)


def codebook_flops(view: int, grid: int, vocab: int) -> float:
    """FLOPs of the codebook tokenizer: each cell's feature (3c² + 3) against every code."""
    cell = view // grid
    return 2.0 * grid * grid * (3 * cell * cell + 3) * vocab


def tokenizer_flops(data: Any, vocab: int | None = None) -> float:
    """Per-image FLOPs of ``data.tokenizer`` at ``data.tokenizer_image_size`` (0 for none); the
    codebook's ``vocab`` is the model's (unset: 8192)."""
    grid = data.image_size // data.patch_size
    view = data.tokenizer_image_size or 8 * grid
    if data.tokenizer == "dalle":
        return dalle_flops(view)
    if data.tokenizer == "codebook":
        return codebook_flops(view, grid, vocab or 8192)
    return 0.0


def gpu_images_per_s(flops: float, kind: str) -> float:
    return GPU_EFFICIENCY * GPU_BF16_TFLOPS[kind] * 1e12 / flops


def cpu_images_per_s(flops: float, workload: str) -> float:
    """Images/s of one core running ``workload`` (a CPU tokenizer actor's thread)."""
    return CPU_GFLOPS_PER_CORE[workload] * 1e9 / flops


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Feed:
    """What the training wants and what must feed it."""

    train_rate: float
    """Images/s the training workers consume at full speed."""
    train_on: str
    """'8 × H100 (assumed)' or '2 workers × 0.5 CPU'."""
    decode_cores: float
    """CPU cores of decode/augment/mask tasks for ``train_rate``."""
    tokenizer: str
    tokenizer_gpus: float
    """GPUs per tokenizer actor (0: CPU actors)."""
    actor_rate: float
    """Images/s of one tokenizer actor (0 without a tokenizer stage)."""
    actors_needed: int
    tokenizer_gpus_needed: float
    """GPUs the needed actors hold together."""
    verdict: str
    ok: bool

    def lines(self) -> list[str]:
        """The plan's lines (``plan.pretrain``)."""
        if not self.train_rate:
            return [f"  feed     {self.verdict}"]
        decode = (
            f"decode ≈ {self.decode_cores:.3g} CPU cores ({CPU_DECODE_IMAGES_PER_CORE:g}/core, "
            "measured)"
            if self.decode_cores
            else "no decode stage"
        )
        out = [f"  feed     {self.train_on} train ≈ {_rate(self.train_rate)} images/s; {decode}"]
        if self.actor_rate:
            where = (
                f"{self.tokenizer_gpus:g}-GPU" if self.tokenizer_gpus else "CPU"
            ) + f" actors ≈ {_rate(self.actor_rate)} images/s each"
            out.append(f"  tokens   {self.tokenizer} on {where}: {self.verdict}")
        else:
            out.append(f"  tokens   {self.verdict}")
        return out


def _rate(x: float) -> str:
    return f"{x / 1e3:.3g}k" if x >= 1e3 else f"{x:.3g}"


def estimate(cfg: Any, gpus: float | None = None, tokenizer_gpus: float | None = None) -> Feed:
    """The feed of a pretraining config. ``gpus``: GPUs the cluster has or can add (None:
    unknown); ``tokenizer_gpus``: GPUs per tokenizer actor as the run resolves them (None: the
    config's, unset meaning 1, as ``runtime.tokenizer_choice`` decides for GPU training)."""
    s, data = cfg.scaling, cfg.data
    if not s.use_gpu:
        return Feed(0.0, f"{s.num_workers} CPU workers", 0.0, data.tokenizer, 0.0, 0.0, 0, 0.0,
                    "training on CPU: the model step, not the feed, sets the pace", True)  # fmt: skip
    step = mim_step_flops(
        cfg.model.flavour, data.image_size, data.masking_patches, cfg.model.vocab_size
    )
    kind = s.gpu_kind or UNKNOWN_GPU
    train_rate = s.num_workers * gpu_images_per_s(step, kind)
    train_on = (
        f"{s.num_workers} × {kind} ({step / 1e9:.3g} GFLOP/image at {GPU_EFFICIENCY:g} of bf16 "
        f"peak, assumed{'' if s.gpu_kind else '; scaling.gpu_kind unset'})"
    )
    base = dict(train_rate=train_rate, train_on=train_on,
                decode_cores=train_rate / CPU_DECODE_IMAGES_PER_CORE)  # fmt: skip
    if cfg.shards or data.tokenizer == "none":
        why = "read from shards" if cfg.shards else "data.tokenizer none"
        if cfg.shards:  # the shards hold decoded views, masks and tokens: parquet reads only
            base["decode_cores"] = 0.0
        return Feed(**base, tokenizer=data.tokenizer, tokenizer_gpus=0.0, actor_rate=0.0,
                    actors_needed=0, tokenizer_gpus_needed=0.0, verdict=f"no tokenizer stage ({why})",
                    ok=True)  # fmt: skip
    per = tokenizer_gpus if tokenizer_gpus is not None else data.tokenizer_num_gpus
    per = 1.0 if per is None else per
    tok = tokenizer_flops(data, cfg.model.vocab_size)
    lo, hi = data.tokenizer_actors
    if per > 0:
        actor_rate = per * gpu_images_per_s(tok, kind)
    else:
        threads = max(1, math.ceil(data.tokenizer_num_cpus))
        actor_rate = threads * cpu_images_per_s(tok, data.tokenizer)
    need = max(1, math.ceil(train_rate / actor_rate - 1e-9))
    tok_gpus = need * per
    if per > 0 and gpus is not None and s.num_workers + tok_gpus > gpus + 1e-9:
        verdict = (
            f"needs {need} actors = {tok_gpus:g} GPUs beside the {s.num_workers} training ones, "
            f"the cluster has {gpus:g}: tokenize once ahead (jobs/tokenize_shards.py) and "
            "pretrain with --shards, or lower scaling.num_workers"
        )
    elif per == 0 and need * threads > CPU_TOKENIZER_CORES_PER_GPU * s.num_workers:
        verdict = (
            f"needs {need} CPU actors (≈ {need * threads} cores): use GPU actors "
            "(data.tokenizer_num_gpus) or tokenize once ahead (jobs/tokenize_shards.py, then "
            "--shards)"
        )
    elif need > hi:
        gpus_note = f" ({tok_gpus:g} GPUs)" if per else ""
        verdict = (
            f"needs {need} actors{gpus_note}, the pool allows {hi}: set "
            f"data.tokenizer_actors [{min(lo, need)},{need}] or more"
        )
    else:
        verdict = f"the pool is enough ({need} of at most {hi} actors keep up)"
    return Feed(**base, tokenizer=data.tokenizer, tokenizer_gpus=per, actor_rate=actor_rate,
                actors_needed=need, tokenizer_gpus_needed=tok_gpus, verdict=verdict,
                ok=verdict.startswith("the pool is enough"))  # fmt: skip
