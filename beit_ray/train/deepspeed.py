"""The one place a training config becomes a DeepSpeed config dict, and the optimizer for it."""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from beit_ray import storage
from beit_ray.train.config import TrainConfig


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed JSON for ``cfg``: batch, accumulation, clipping, ZeRO + offload, precision.

    The optimizer and the lr schedule are not in it: the loop passes a torch optimizer built
    from layer-decay groups and sets each group's lr every step. ``deepspeed.override`` (a
    mapping or a JSON file) is merged over the result, key by key.
    """
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        b = ds.bucket_size
        zero.update(
            contiguous_gradients=True,
            overlap_comm=False,
            reduce_bucket_size=b,
            allgather_bucket_size=b,
            # gloo's reduce-scatter takes twice as long as its all-reduce of the same buffer
            # (92 M fp32 on 2 ranks: 0.58 s vs 0.29 s): on CPU, all-reduce and keep the part.
            reduce_scatter=cfg.scaling.use_gpu,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if ds.zero_stage == 3:
        # No 16-bit copy on save: consolidation reads the fp32 partitions. Gathered (whole)
        # parameters live in fp32 on the CPU: bound them by the bucket size, not DeepSpeed's
        # defaults (1e9 elements = 4 GB), and cut the optimizer's sub-groups (each one gets a
        # gradient buffer of its *unpartitioned* size) to the same size.
        zero.update(
            stage3_gather_16bit_weights_on_model_save=False,
            stage3_prefetch_bucket_size=ds.bucket_size,
            stage3_max_live_parameters=ds.bucket_size,
            stage3_max_reuse_distance=ds.bucket_size,
            sub_group_size=ds.bucket_size,
        )
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": ds.grad_accum_steps,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {
            "enabled": ds.precision == "fp16",
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
