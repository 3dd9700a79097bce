"""Typed configs of the training jobs: ``PretrainConfig`` and ``FinetuneConfig``.

Both share the optimiser, DeepSpeed, scaling, checkpoint, run and debug sections; they differ in
the model/data sections and the task. Every field is documented and validated here, so a bad
value fails before Ray starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from beit_ray.config import ModelConfig, RayConfig, StorageConfig, check
from beit_ray.data.config import DataConfig
from beit_ray.feed import GPU_BF16_TFLOPS
from beit_ray.models.flavours import get_flavour


@dataclass(frozen=True)
class Recipe:
    """One task's BEiT fine-tuning/pretraining defaults (unilm ``beit/``), filled into the
    ``optim`` fields left unset."""

    base_lr: float
    base_batch: int
    min_lr: float
    schedule: Literal["cosine", "poly"]
    clip_grad: float
    warmup_epochs: float | None = None
    warmup_steps: int | None = None
    layer_decay: float | None = None
    """None: the flavour's (0.65 base, 0.75 large)."""
    mixup: float = 0.0
    cutmix: float = 0.0


def recipe(task: str, flavour: str) -> Recipe:
    """BEiT's recipe for ``task`` (mim, classification, segmentation) and model ``flavour``.

    mim: run_beit_pretraining.py as the README runs it (lr 1.5e-3 at 2048, 10 warmup epochs,
    clip 3.0). classification: get_started_for_image_classification.md for self-supervised
    checkpoints (base: lr 4e-3 at 8 × 128, 20 of 100 warmup epochs; large: 1e-3 at 8 × 64 × 2,
    5 of 50), mixup 0.8 / cutmix 1.0, min lr 1e-6, no clipping. segmentation: the mmseg UperNet
    config for self-supervised BEiT (upernet_beit_base_12_512_slide_160k_ade20k_pt.py: lr 7e-4
    at 8 × 2, layer decay 0.65, poly to 0 after 1,500 linear warmup iterations, no clipping).
    """
    large = flavour.endswith("large")
    if task == "mim":
        return Recipe(1.5e-3, 2048, 1e-5, "cosine", 3.0, warmup_epochs=10, layer_decay=1.0)
    if task == "classification":
        lr, warm = (1e-3, 5) if large else (4e-3, 20)
        return Recipe(lr, 1024, 1e-6, "cosine", 0.0, warmup_epochs=warm, mixup=0.8, cutmix=1.0)
    if task == "segmentation":
        return Recipe(7e-4, 16, 0.0, "poly", 0.0, warmup_steps=1500)
    raise ValueError(f"no recipe for task {task!r}")


@dataclass
class OptimConfig:
    """AdamW, linear warmup, then cosine or poly decay; unset fields take the task's BEiT recipe
    (:func:`recipe`), filled in by the job config."""

    base_lr: float | None = None
    """Peak learning rate at ``base_batch``; the actual peak is base_lr * global_batch /
    base_batch. Unset: 1.5e-3 pretraining, 4e-3 classification (1e-3 large), 7e-4 segmentation."""
    base_batch: int | None = None
    """Global batch the base_lr refers to (linear scaling rule); unset: 2048 pretraining, 1024
    classification, 16 segmentation."""
    lr: float | None = None
    """Absolute peak learning rate; overrides the linear scaling when set."""
    min_lr: float | None = None
    """Learning rate at the end of the decay, never above the peak (clamped: a small batch
    scales the peak below it); unset: 1e-5 pretraining, 1e-6 classification, 0 segmentation."""
    schedule: Literal["cosine", "poly"] | None = None
    """Decay after warmup: cosine (BEiT) or poly (mmseg; power poly_power over the whole run);
    unset: poly for segmentation, cosine otherwise."""
    poly_power: float = 1.0
    """Exponent of the poly decay (mmseg's BEiT configs: 1.0, linear)."""
    warmup_epochs: float | None = None
    """Linear warmup in epochs (needs run.epochs to define the run, not run.max_steps)."""
    warmup_steps: int | None = None
    """Linear warmup in optimizer steps; wins over warmup_epochs. Both unset: the task's (10
    epochs pretraining, 20 classification (5 large), 1,500 steps segmentation), at most
    warmup_fraction of the run."""
    warmup_fraction: float = 0.2
    """Cap of the task's default warmup as a share of the run, so short runs still decay (BEiT's
    classification recipe: 20 of 100 epochs); an explicit warmup is kept as given."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (BEiT's pretraining and fine-tuning commands: 0.9, 0.999)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.05
    """Decoupled weight decay (not applied to biases, norms, tokens and position tables)."""
    clip_grad: float | None = None
    """Gradient-norm clipping (0 disables); unset: 3.0 pretraining, 0 fine-tuning."""
    layer_decay: float | None = None
    """Layer-wise lr decay; unset: 1.0 for pretraining, the flavour's (0.65 base / 0.75 large)
    for fine-tuning."""
    optimizer: Literal["auto", "adamw", "adamw_fused", "cpu_adam"] = "auto"
    """auto: torch's fused AdamW (one pass over each tensor; ~3x faster than the per-op AdamW on
    CPU), or DeepSpeedCPUAdam when the optimizer is offloaded (a JIT-built op). adamw: torch
    AdamW with its per-op (foreach / per-tensor) implementation."""
    label_smoothing: float = 0.1
    """Classification label smoothing (with mixup/cutmix, of both mixed targets, as timm's Mixup)."""
    mixup: float | None = None
    """Classification mixup alpha (0 disables); unset: 0.8 (BEiT's fine-tuning command)."""
    cutmix: float | None = None
    """Classification cutmix alpha (0 disables); unset: 1.0. With both on, each batch takes one
    (even odds), as timm's Mixup."""
    reprob: float = 0.25
    """Classification random erasing (timm 'pixel' mode, BEiT's --reprob): each training image
    has one box (2%-33% of the area, aspect 0.3-3.3) replaced by N(0, 1) noise after
    normalization, with this probability (0 disables)."""

    def __post_init__(self) -> None:
        def unset_or(name: str, ok: bool, why: str) -> None:
            check(getattr(self, name) is None or ok, f"optim.{name}", why)

        unset_or("base_lr", (self.base_lr or 0) > 0, "must be positive")
        unset_or("base_batch", (self.base_batch or 0) > 0, "must be positive")
        unset_or("lr", (self.lr or 0) > 0, "must be positive")
        unset_or("min_lr", (self.min_lr or 0) >= 0, "must be >= 0")
        check(self.poly_power > 0, "optim.poly_power", "must be positive")
        unset_or("warmup_epochs", (self.warmup_epochs or 0) >= 0, "must be >= 0")
        unset_or("warmup_steps", (self.warmup_steps or 0) >= 0, "must be >= 0")
        check(0 <= self.warmup_fraction <= 1, "optim.warmup_fraction", "must be in [0, 1]")
        check(all(0 <= b < 1 for b in self.betas), "optim.betas", "each must be in [0, 1)")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        unset_or("clip_grad", (self.clip_grad or 0) >= 0, "must be >= 0")
        check(
            self.layer_decay is None or 0 < self.layer_decay <= 1,
            "optim.layer_decay",
            "must be in (0, 1]",
        )
        check(0 <= self.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)")
        unset_or("mixup", (self.mixup or 0) >= 0, "must be >= 0")
        unset_or("cutmix", (self.cutmix or 0) >= 0, "must be >= 0")
        check(0 <= self.reprob <= 1, "optim.reprob", "must be in [0, 1]")

    def with_recipe(self, r: Recipe, flavour_layer_decay: float) -> OptimConfig:
        """A copy with every unset field taken from ``r`` (warmup stays unset: it depends on the
        run's length, see beit_ray.train.schedule.warmup_steps)."""
        fill = {
            "base_lr": r.base_lr,
            "base_batch": r.base_batch,
            "min_lr": r.min_lr,
            "schedule": r.schedule,
            "clip_grad": r.clip_grad,
            "layer_decay": r.layer_decay if r.layer_decay is not None else flavour_layer_decay,
            "mixup": r.mixup,
            "cutmix": r.cutmix,
        }
        return dataclasses.replace(
            self, **{k: v for k, v in fill.items() if getattr(self, k) is None}
        )


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
    """Training precision. bf16: autocast over fp32 weights (fp32 gradients, reduction and master
    weights); fp16: DeepSpeed's fp16 with dynamic loss scaling. auto: bf16 with scaling.use_gpu
    (tensor cores; TF32 for what stays fp32), fp32 on CPU (bf16 is ~3x slower without AMX)."""
    initial_scale_power: int = 16
    """fp16: the initial loss scale is 2**this."""
    loss_scale: float = 0.0
    """fp16: a fixed loss scale; 0 means dynamic."""
    bucket_size: int | None = None
    """Elements per ZeRO communication bucket, ZeRO-3 live/prefetch limit and optimizer sub-group.
    Unset: 5e7 on CPU (DeepSpeed's defaults, up to 1e9, hold gigabytes of fp32 buffers there);
    on GPU buckets of 1/8 of the model (at most 5e8), so reduction overlaps the backward, and
    DeepSpeed's 1e9 ZeRO-3 limits."""
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
    gpu_kind: str | None = None
    """The training GPUs' model (H100, H200, A100, A10G, L4), for the plan's data-feed estimate
    (beit_ray/feed.py); unset: sized for the fastest, an H100."""

    def __post_init__(self) -> None:
        check(
            self.gpu_kind is None or self.gpu_kind in GPU_BF16_TFLOPS,
            "scaling.gpu_kind",
            f"one of {', '.join(GPU_BF16_TFLOPS)} (unset: H100)",
        )
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
    every_n_minutes: float = 30.0
    """Checkpoint when this many minutes passed since the last one (read on logging steps; 0:
    off): a lost worker or a preempted node costs at most this much work."""
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
    """Seed of model init, every per-step random draw (mixup, cutmix, drop path) and, unless
    data.seed is set, of the data (listing shuffle, read order, crops, flips, masks)."""
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
    record_rows: str | None = None
    """A local folder: each rank appends, per micro-step, the epoch places (pos, idx) of the rows
    it trained on (a test hook: a resumed epoch must see every image once)."""


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

    @property
    def task_name(self) -> str:
        """The recipe's task: mim, classification or segmentation."""
        raise NotImplementedError

    def resolve(self, data: DataConfig) -> DataConfig:
        """Fill the task's recipe into ``optim`` and return ``data`` sized by the model (the one
        place a job's resolution comes from: ``--model.image_size``) and seeded by the run
        unless ``data.seed`` is set."""
        f = get_flavour(self.model.flavour)
        size = self.model.image_size or f.image_size
        check(
            size % f.patch_size == 0,
            "model.image_size",
            f"must be a multiple of the {self.model.flavour} patch size {f.patch_size}",
        )
        self.optim = self.optim.with_recipe(
            recipe(self.task_name, self.model.flavour), f.layer_decay
        )
        check(
            self.optim.warmup_epochs is None
            or self.optim.warmup_steps is not None
            or self.run.max_steps is None,
            "optim.warmup_epochs",
            "run.max_steps sets the run's length in steps: give optim.warmup_steps instead",
        )
        return data.fit_model(size, f.patch_size, seed=self.run.seed)


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

    @property
    def task_name(self) -> str:
        return "mim"

    def __post_init__(self) -> None:
        self.data = self.resolve(self.data)
        self.data.check_masked_patches()


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

    @property
    def task_name(self) -> str:
        return self.task

    def __post_init__(self) -> None:
        self.data = self.resolve(self.data)  # no tokenizer or mask check: fine-tuning has none
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
