"""The one place a training config becomes a DeepSpeed config dict, and the optimizer for it."""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from beit_ray import storage
from beit_ray.train.config import TrainConfig

# DeepSpeed 0.19's own defaults (runtime/zero/config.py): the GPU bucket's ceiling, ZeRO-3 limits.
GPU_BUCKET = 500_000_000
GPU_STAGE3_LIMIT = 1_000_000_000
CPU_BUCKET = 50_000_000
BUCKETS_PER_MODEL = 8
"""GPU: gradients are reduced in about this many buckets, so the first ones go out while the
backward still runs (DeepSpeed's 5e8 default exceeds BEiT-large, 304 M: one bucket, filled only
when the backward ends, so nothing overlapped)."""
MIN_GPU_BUCKET = 1 << 20


def precision(cfg: TrainConfig) -> str:
    """The resolved ``deepspeed.precision``: auto is bf16 on GPU workers, fp32 on CPU."""
    p = cfg.deepspeed.precision
    if p != "auto":
        return p
    return "bf16" if cfg.scaling.use_gpu else "fp32"


def torch_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype of the model's parameters and inputs: fp16 for DeepSpeed's fp16 mode, else
    fp32 (bf16 is autocast compute over fp32 parameters: see :func:`deepspeed_config`)."""
    return torch.float16 if precision(cfg) == "fp16" else torch.float32


def bucket_elements(cfg: TrainConfig, model_numel: int | None) -> int:
    """Elements per ZeRO bucket: ``deepspeed.bucket_size``, else on CPU the tuned 5e7, else on
    GPU 1/``BUCKETS_PER_MODEL`` of the model (within [1 Mi, 5e8]) so reduction overlaps backward."""
    if cfg.deepspeed.bucket_size:
        return cfg.deepspeed.bucket_size
    if not cfg.scaling.use_gpu:
        return CPU_BUCKET
    if not model_numel:
        return GPU_BUCKET
    return int(min(GPU_BUCKET, max(MIN_GPU_BUCKET, model_numel // BUCKETS_PER_MODEL)))


def mmap_threshold(cfg: TrainConfig) -> int:
    """glibc threshold for this run: the CPU ZeRO-3 fix is for host-resident tensors, so GPU
    workers (whose large tensors live on the device) keep glibc's default unless set."""
    ds = cfg.deepspeed
    if ds.malloc_mmap_threshold is None and cfg.scaling.use_gpu:
        return 0
    return ds.mmap_threshold()


def enable_tf32() -> None:
    """fp32 matmuls and convolutions on tensor cores (TF32) for whatever stays fp32 on a GPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def deepspeed_config(cfg: TrainConfig, model_numel: int | None = None) -> dict[str, Any]:
    """DeepSpeed JSON for ``cfg``: batch, accumulation, clipping, ZeRO + offload, precision.

    The optimizer and the lr schedule are not in it: the loop passes a torch optimizer built
    from layer-decay groups and sets each group's lr every step. ``deepspeed.override`` (a
    mapping or a JSON file) is merged over the result, key by key. CPU and GPU differ: the CPU
    values were tuned on gloo and host memory (bench/RESULTS.md); on GPU communication overlaps
    the backward in buckets sized from ``model_numel`` (:func:`bucket_elements`), offload is
    pinned, and ZeRO-3 keeps DeepSpeed's 1e9 limits.

    bf16 is done as unilm and timm train BEiT (and as torchtitan reduces): torch autocast runs
    the matmuls in bf16 while parameters, gradients, their reduction and accumulation, and the
    optimizer stay fp32, so the master weights are the module's and are what a checkpoint holds
    and exports. DeepSpeed's own bf16 mode would keep bf16 parameters and reduce and accumulate
    bf16 gradients (ZeRO-0 would even export the bf16-rounded weights).
    """
    ds, gpu = cfg.deepspeed, cfg.scaling.use_gpu
    bucket = bucket_elements(cfg, model_numel)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            contiguous_gradients=True,
            # On GPU the gradient reduction overlaps the backward on its own CUDA stream; gloo
            # on CPU has no such stream and only pays the extra buffers.
            overlap_comm=gpu,
            reduce_bucket_size=bucket,
            allgather_bucket_size=bucket,
            # gloo's reduce-scatter takes twice as long as its all-reduce of the same buffer
            # (92 M fp32 on 2 ranks: 0.58 s vs 0.29 s): on CPU, all-reduce and keep the part.
            reduce_scatter=gpu,
        )
    # Pinned host buffers make GPU<->CPU copies asynchronous; on CPU there is no copy.
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    if ds.zero_stage == 3:
        # No 16-bit copy on save: consolidation reads the fp32 partitions.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if ds.bucket_size or not gpu:
            # On CPU gathered (whole) parameters live in fp32 in host memory: bound them by the
            # bucket size, not DeepSpeed's defaults (1e9 elements = 4 GB), and cut the
            # optimizer's sub-groups (each one gets a gradient buffer of its *unpartitioned*
            # size) to the same size.
            zero.update(
                stage3_prefetch_bucket_size=bucket,
                stage3_max_live_parameters=bucket,
                stage3_max_reuse_distance=bucket,
                sub_group_size=bucket,
            )
        else:
            zero.update(
                stage3_max_live_parameters=GPU_STAGE3_LIMIT,
                stage3_max_reuse_distance=GPU_STAGE3_LIMIT,
                sub_group_size=GPU_STAGE3_LIMIT,
            )
    prec = precision(cfg)
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        # No module is "lower-precision safe": DeepSpeed would then reduce (and under ZeRO-3
        # gather) those parameters' tensors in bf16.
        "torch_autocast": {
            "enabled": prec == "bf16",
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        },
        "fp16": {
            "enabled": prec == "fp16",
            "loss_scale": ds.loss_scale,
            "initial_scale_power": ds.initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # Progress is logged by beit_ray.train.observe; keep DeepSpeed's own prints quiet.
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return merge(out, load_override(ds.override, cfg))


def tune_allocator(mmap_threshold: int) -> bool:
    """Fix glibc's mmap threshold (bytes) in this process; False where there is no glibc.

    glibc raises its threshold each time a large mmapped block is freed, so soon every tensor
    comes from the heap, whose freed holes are kept, not returned: RSS then grows with each
    ZeRO-3 gather. A fixed threshold also switches that sliding rule off.
    """
    if mmap_threshold <= 0:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, mmap_threshold))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def share_fp32_partitions(engine: Any) -> int:
    """ZeRO-3 without 16-bit weights: make the fp32 master partitions the module's partitions.

    DeepSpeed 0.19 means to alias them when dtype and device match (stage3.py
    ``_create_fp32_partitions``) but compares a ``torch.device`` with the string ``"cpu"``,
    which is False, so on CPU each rank kept a second fp32 copy of its partition. After this
    the optimizer updates the module's partition in place and DeepSpeed's copy back is a
    self-copy. Returns the bytes freed (0 when nothing applies: ZeRO < 3, bf16/fp16, offload).
    """
    opt = getattr(engine, "optimizer", None)
    low = getattr(opt, "fp16_partitioned_groups_flat", None)
    high = getattr(opt, "fp32_partitioned_groups_flat", None)
    if not low or not high or getattr(opt, "offload_optimizer", False):
        return 0
    freed = 0
    for lo, hi in zip(low, high, strict=True):
        if (
            lo is None
            or lo.dtype != hi.dtype
            or lo.device != hi.device
            or lo.shape != hi.shape
            or lo.data_ptr() == hi.data_ptr()
        ):
            continue
        with torch.no_grad():
            lo.copy_(hi)  # equal already; keep the master values authoritative anyway
        freed += hi.numel() * hi.element_size()
        hi.data = lo.data  # same Parameter object: optimizer state keys are unchanged
    return freed


def load_override(override: dict[str, Any] | str | None, cfg: TrainConfig) -> dict[str, Any]:
    if override is None:
        return {}
    if isinstance(override, dict):
        return override
    return json.loads(storage.read_text(override, cfg.storage))


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``, recursively for nested mappings."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over layer-decay groups: fused by default, DeepSpeedCPUAdam when offloaded."""
    o = cfg.optim
    kind = o.optimizer
    if kind == "auto":
        kind = "cpu_adam" if cfg.deepspeed.offload_optimizer else "adamw_fused"
    # DeepSpeed keeps extra group keys (lr_scale) but cannot flatten lists of names.
    groups = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            groups,
            lr=cfg.peak_lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            adamw_mode=True,
        )
    return torch.optim.AdamW(
        groups,
        lr=cfg.peak_lr,
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=kind == "adamw_fused" or None,
    )
