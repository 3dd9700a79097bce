"""Typed configs of the training jobs: ``PretrainConfig`` and ``FinetuneConfig``.

Both share the optimiser, DeepSpeed, scaling, checkpoint, run and debug sections; they differ in
the model/data sections and the task. Every field is documented and validated here, so a bad
value fails before Ray starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from beit_ray.config import ModelConfig, RayConfig, StorageConfig, check
from beit_ray.data.config import DataConfig
from beit_ray.models.flavours import get_flavour


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine decay; BEiT recipe defaults."""

    base_lr: float = 1.5e-3
    """Peak learning rate at ``base_batch``; the actual peak is base_lr * global_batch / base_batch."""
    base_batch: int = 2048
    """Global batch the base_lr refers to (linear scaling rule)."""
    lr: float | None = None
    """Absolute peak learning rate; overrides the linear scaling when set."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int | None = None
    """Linear warmup steps; unset: 5% of the total steps."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.05
    """Decoupled weight decay (not applied to biases, norms, tokens and position tables)."""
    clip_grad: float = 3.0
    """Gradient-norm clipping (0 disables)."""
    layer_decay: float | None = None
    """Layer-wise lr decay; unset: 1.0 for pretraining, the flavour's (0.65 base / 0.75 large) for
    classification, 0.9 for segmentation."""
    optimizer: Literal["auto", "adamw", "adamw_fused", "cpu_adam"] = "auto"
    """auto: torch's fused AdamW (one pass over each tensor; ~3x faster than the per-op AdamW on
    CPU), or DeepSpeedCPUAdam when the optimizer is offloaded (a JIT-built op). adamw: torch
    AdamW with its per-op (foreach / per-tensor) implementation."""
    label_smoothing: float = 0.1
    """Classification label smoothing."""
    mixup: float = 0.0
    """Classification mixup alpha (0 disables)."""
    cutmix: float = 0.0
    """Classification cutmix alpha (0 disables); with both set, one is picked per batch."""
    reprob: float = 0.25
    """Classification random erasing (timm 'pixel' mode, BEiT's --reprob): each training image
    has one box (2%-33% of the area, aspect 0.3-3.3) replaced by N(0, 1) noise after
    normalization, with this probability (0 disables)."""

    def __post_init__(self) -> None:
        check(self.base_lr > 0, "optim.base_lr", "must be positive")
        check(self.base_batch > 0, "optim.base_batch", "must be positive")
        check(self.lr is None or self.lr > 0, "optim.lr", "must be positive")
        check(self.min_lr >= 0, "optim.min_lr", "must be >= 0")
        check(
            self.warmup_steps is None or self.warmup_steps >= 0,
            "optim.warmup_steps",
            "must be >= 0",
        )
        check(all(0 <= b < 1 for b in self.betas), "optim.betas", "each must be in [0, 1)")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(self.clip_grad >= 0, "optim.clip_grad", "must be >= 0")
        check(
            self.layer_decay is None or 0 < self.layer_decay <= 1,
            "optim.layer_decay",
            "must be in (0, 1]",
        )
        check(0 <= self.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)")
        check(self.mixup >= 0, "optim.mixup", "must be >= 0")
        check(self.cutmix >= 0, "optim.cutmix", "must be >= 0")
        check(0 <= self.reprob <= 1, "optim.reprob", "must be in [0, 1]")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed engine settings; turned into a DeepSpeed config by beit_ray.train.deepspeed."""

    micro_batch_size: int = 8
    """Images per worker per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    zero_stage: int = 2
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU (ZeRO >= 1; uses DeepSpeedCPUAdam)."""
    offload_params: bool = False
    """Keep parameters on CPU between uses (ZeRO-3 only)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision; fp16 uses dynamic loss scaling. auto: bf16 with scaling.use_gpu
    (tensor cores; TF32 for what stays fp32), fp32 on CPU (bf16 is ~3x slower without AMX)."""
    initial_scale_power: int = 16
    """fp16: the initial loss scale is 2**this."""
    loss_scale: float = 0.0
    """fp16: a fixed loss scale; 0 means dynamic."""
    bucket_size: int | None = None
    """Elements per ZeRO communication bucket, ZeRO-3 live/prefetch limit and optimizer sub-group.
    Unset: 5e7 on CPU (DeepSpeed's defaults, up to 1e9, hold gigabytes of fp32 buffers there),
    DeepSpeed's own defaults on GPU (5e8 buckets, 1e9 ZeRO-3 limits)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations during backward instead of keeping them: ~1/3 more
    compute for a fraction of the activation memory (BEiT-large at 512 px needs it)."""
    compile: bool = False
    """torch.compile the model's encoder blocks (minutes of compile per worker start). Off by
    default: not yet measured to pay; bench/gpu_check.py times it on a GPU."""
    override: dict[str, Any] | str | None = None
    """Raw DeepSpeed JSON merged over the generated config: a mapping, or a path/URI to a JSON file."""
    malloc_mmap_threshold: int | None = None
    """Bytes from which glibc serves (and on free, returns) allocations with their own mmap, fixed
    on each worker; 0 keeps glibc's sliding default; unset: 1 MiB under ZeRO-3, else 0. Fixed and
    small, the many transient tensors (ZeRO-3 gathers, gradient buckets) go back to the OS when
    freed instead of staying in a fragmented heap (BEiT-large, ZeRO-3, 2 workers: peak RSS per
    worker 5.6 → 3.4 GiB), but every large activation then costs fresh page faults (BEiT-base at
    224 px: ~20% slower steps), so stages 0-2 keep glibc's default."""

    def __post_init__(self) -> None:
        check(self.micro_batch_size > 0, "deepspeed.micro_batch_size", "must be positive")
        check(self.grad_accum_steps > 0, "deepspeed.grad_accum_steps", "must be positive")
        check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        check(
            not self.offload_optimizer or self.zero_stage >= 1,
            "deepspeed.offload_optimizer",
            "needs zero_stage >= 1",
        )
        check(
            not self.offload_params or self.zero_stage == 3,
            "deepspeed.offload_params",
            "needs zero_stage 3",
        )
        check(self.loss_scale >= 0, "deepspeed.loss_scale", "must be >= 0")
        check(
            self.bucket_size is None or self.bucket_size > 0,
            "deepspeed.bucket_size",
            "must be positive",
        )
        check(
            self.malloc_mmap_threshold is None or self.malloc_mmap_threshold >= 0,
            "deepspeed.malloc_mmap_threshold",
            "must be >= 0",
        )

    def mmap_threshold(self) -> int:
        """The resolved ``malloc_mmap_threshold`` (0: glibc's default)."""
        if self.malloc_mmap_threshold is not None:
            return self.malloc_mmap_threshold
        return 1 << 20 if self.zero_stage == 3 else 0


@dataclass
class ScalingSection:
    """How many Ray Train workers and what each one holds."""

    num_workers: int = 2
    """Training workers (one DeepSpeed rank each)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 0.5
    """Logical CPUs reserved per worker. Fractional by default: workers holding every CPU leave
    none for Ray Data's read tasks and the run hangs silently."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Placement of the workers over nodes (STRICT_SPREAD: one per node)."""
    threads_per_worker: int | None = None
    """torch CPU threads per worker; unset: the node's cores shared evenly by the workers on it
    (Ray's own default is the worker's CPU reservation, 1 thread for a fractional one)."""

    def __post_init__(self) -> None:
        check(self.num_workers > 0, "scaling.num_workers", "must be positive")
        check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", "must be positive")
        check(
            self.threads_per_worker is None or self.threads_per_worker >= 1,
            "scaling.threads_per_worker",
            "must be >= 1",
        )


@dataclass
class CheckpointSection:
    """Where the run lives and how often it checkpoints."""

    storage_path: str = "./runs"
    """Runs folder, local or s3://bucket/prefix; the run is <storage_path>/<name>."""
    name: str = "pretrain-debug"
    """Run name; running the same name again resumes from its latest checkpoint."""
    every_n_steps: int = 0
    """Checkpoint every N optimizer steps (0: only at the end / each epoch for fine-tuning)."""
    every_n_minutes: float = 0.0
    """Checkpoint when this many minutes passed since the last one (0: off)."""
    keep_last: int = 2
    """Checkpoints kept (fine-tuning also keeps the best by its validation metric)."""
    max_failures: int = 1
    """Worker-group restarts from the latest checkpoint after a worker dies (-1: unlimited)."""

    def __post_init__(self) -> None:
        check(
            bool(self.name) and "/" not in self.name,
            "checkpoint.name",
            "must be a non-empty name without '/'",
        )
        check(self.every_n_steps >= 0, "checkpoint.every_n_steps", "must be >= 0")
        check(self.every_n_minutes >= 0, "checkpoint.every_n_minutes", "must be >= 0")
        check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        check(self.max_failures >= -1, "checkpoint.max_failures", "must be >= -1")


@dataclass
class RunSection:
    """Length, seed and logging of the run."""

    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (also sets the schedule length)."""
    steps_per_epoch: int | None = None
    """Optimizer steps per pass over the training dataset (one epoch, or all of them when the
    pipeline lays every epoch out in one dataset); unset: counted before training."""
    seed: int = 0
    """Seed of model init and every per-step random draw (mixup, cutmix)."""
    log_every: int = 10
    """Progress line, TensorBoard and metrics.jsonl every N steps."""

    def __post_init__(self) -> None:
        check(self.epochs > 0, "run.epochs", "must be positive")
        check(self.max_steps is None or self.max_steps > 0, "run.max_steps", "must be positive")
        check(
            self.steps_per_epoch is None or self.steps_per_epoch > 0,
            "run.steps_per_epoch",
            "must be positive",
        )
        check(self.log_every > 0, "run.log_every", "must be positive")


@dataclass
class DebugSection:
    """Fault injection for tests and drills."""

    fail_rank: int | None = None
    """This rank exits hard once (a marker file in the run makes it once) at fail_at_step."""
    fail_at_step: int = 0
    """Optimizer step at which fail_rank exits."""
    stop_at_step: int | None = None
    """Checkpoint and stop cleanly after this step, as a preempted job would (rerun to resume)."""


@dataclass
class TrainConfig:
    """Sections shared by every training job."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to build or start from."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    scaling: ScalingSection = field(default_factory=ScalingSection)
    """Ray Train workers."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Run location and checkpoints."""
    run: RunSection = field(default_factory=RunSection)
    """Length, seed, logging."""
    debug: DebugSection = field(default_factory=DebugSection)
    """Fault injection."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray connection."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-store credentials."""

    @property
    def global_batch(self) -> int:
        return (
            self.deepspeed.micro_batch_size
            * self.deepspeed.grad_accum_steps
            * self.scaling.num_workers
        )

    @property
    def peak_lr(self) -> float:
        return self.optim.lr or self.optim.base_lr * self.global_batch / self.optim.base_batch

    def warmup(self, total_steps: int) -> int:
        w = self.optim.warmup_steps
        return min(w, total_steps) if w is not None else max(1, math.ceil(0.05 * total_steps))


def fit_data(cfg: TrainConfig, data: DataConfig) -> DataConfig:
    """``data`` with the model's image and patch size (the mask grid is the patch grid).

    Left at DataConfig's defaults (224, patch 16), the sizes follow the model, so the debug
    flavour works with ``--data.source X`` alone; set explicitly, they must match it.
    """
    f = get_flavour(cfg.model.flavour)
    size = cfg.model.image_size or f.image_size
    default = DataConfig()
    if (data.image_size, data.patch_size) == (default.image_size, default.patch_size):
        tok = data.tokenizer_image_size
        if tok == default.tokenizer_image_size:
            tok = 8 * (size // f.patch_size)  # DALL-E's view: 8 pixels per grid cell
        data = dataclasses.replace(
            data, image_size=size, patch_size=f.patch_size, tokenizer_image_size=tok
        )
    check(data.image_size == size, "data.image_size", f"must equal the model's image size {size}")
    check(
        data.patch_size == f.patch_size,
        "data.patch_size",
        f"must equal the model's patch size {f.patch_size}",
    )
    return data


@dataclass
class PretrainConfig(TrainConfig):
    """Masked image modelling (BEiT pretraining) on Ray Train + DeepSpeed."""

    data: DataConfig = field(
        default_factory=lambda: DataConfig(
            source="./runs/demo-data/images",
            tokenizer="codebook",
            tokenizer_weights="./runs/demo-data/codebook.safetensors",
            batch_size=16,
        )
    )
    """Images, masking and visual tokens (the streaming pipeline, used unless `shards` is set)."""
    shards: str | None = None
    """Materialized masked-patch shards written by jobs/tokenize_shards.py (local or s3://)."""

    def __post_init__(self) -> None:
        self.data = fit_data(self, self.data)


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning for classification or semantic segmentation on Ray Train + DeepSpeed."""

    task: Literal["classification", "segmentation"] = "classification"
    """What to fine-tune for."""
    data: DataConfig = field(default_factory=lambda: DataConfig(tokenizer="none"))
    """Labelled images: class folders, per-class tars, WebDataset or parquet (classification),
    ADE20k-format images/ + annotations/ (segmentation)."""
    val_source: str | None = None
    """Validation images (same layout); unset: a `val_fraction` split of data.source by key hash."""
    val_fraction: float = 0.1
    """Share of data.source held out for validation when val_source is unset."""
    reduce_labels: bool = True
    """Segmentation: annotation 0 is background → ignored (255), other labels shift down by one."""
    num_labels: int | None = None
    """Segmentation: number of classes (after reduce_labels); classification reads its classes."""
    seg_scale: tuple[int, int] | None = None
    """Segmentation: (long, short) edge limits of the training rescale (× 0.5–2.0) and of the
    test rescale; unset: mmseg's (4 × data.image_size, data.image_size), ADE20k's (2048, 512)."""
    eval_every_epochs: int = 1
    """Validation (top-1/top-5 or mIoU and pixel accuracy) every N epochs and at the end."""
    checkpoint: CheckpointSection = field(
        default_factory=lambda: CheckpointSection(name="finetune-debug")
    )
    """Run location and checkpoints."""

    def __post_init__(self) -> None:
        self.data = fit_data(self, self.data)
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        check(self.eval_every_epochs > 0, "eval_every_epochs", "must be positive")
        check(self.num_labels is None or self.num_labels > 1, "num_labels", "must be > 1")
        check(
            self.seg_scale is None or len(self.seg_scale) == 2 and min(self.seg_scale) > 0,
            "seg_scale",
            "must be two positive edge lengths (long, short)",
        )
        if self.task == "segmentation":
            get = get_flavour(self.model.flavour)
            check(
                get.family == "beit",
                "model.flavour",
                "segmentation needs a BEiT flavour (UperNet on BEiT)",
            )
