"""The per-worker training loop shared by pretraining and fine-tuning (Ray Train + DeepSpeed).

What differs between tasks lives in a :class:`~beit_ray.train.tasks.Task`; everything else
(DeepSpeed engine, lr schedule, data position, checkpoints, resume, logging) is here.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from beit_ray import storage
from beit_ray.data.plan import POSITION_COLUMNS, EpochProgress
from beit_ray.runtime import say, worker_threads
from beit_ray.train import checkpoint
from beit_ray.train.checkpoint import TrainState
from beit_ray.train.config import TrainConfig
from beit_ray.train.ops import use_own_ninja
from beit_ray.train.resources import feed_options
from beit_ray.train.schedule import lr_at
from beit_ray.train.tasks import Task, make_task


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``; ``config`` = {cfg, extra, total_steps, passes,
    run_uri, clock}.

    A pass is one iteration of the "train" dataset and one epoch: rank 0 sets the epoch clock
    (``beit_ray.data.plan``) before it, so each pass reads a new order with new crops and masks.
    Validation, when the task has one, runs after each pass and at the end.
    """
    import deepspeed
    import ray.train

    cfg: TrainConfig = config["cfg"]
    ctx = ray.train.get_context()
    torch.set_num_threads(
        worker_threads(cfg.scaling.threads_per_worker, ctx.get_local_world_size())
    )
    task = make_task(cfg, config["extra"])
    use_own_ninja()  # DeepSpeed loads (or builds) its ops with the ninja that prebuilt them
    # Inside TorchTrainer this reuses the process group Ray Train has already set up.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    rank = ctx.get_world_rank()
    engine = build_engine(cfg, task)
    state = checkpoint.restore(engine) or TrainState()
    obs = None
    if rank == 0:
        from beit_ray.train.observe import Observer

        obs = Observer(storage.join(config["run_uri"], "logs"), state.step, cfg.storage)
    loop = Loop(cfg, config, task, engine, state, obs, rank)
    while state.step < loop.total and state.passes < config["passes"]:
        if loop.train_pass():
            break
        state.passes, state.micro_in_pass = state.passes + 1, 0
        loop.epoch_done(state.epoch + 1)
    if state.step >= loop.total and task.score:
        loop.evaluate()  # checkpoints with the final score
    else:
        loop.save({})
    if obs:
        obs.close()


class Loop:
    """One worker's training state and the steps of the loop."""

    def __init__(
        self,
        cfg: TrainConfig,
        config: dict,
        task: Task,
        engine: Any,
        state: TrainState,
        obs: Any,
        rank: int,
    ) -> None:
        self.cfg, self.task, self.engine, self.state, self.obs, self.rank = (
            cfg,
            task,
            engine,
            state,
            obs,
            rank,
        )
        self.total, self.run_uri = config["total_steps"], config["run_uri"]
        self.clock = config.get("clock")
        self.last_ckpt = time.monotonic()
        self.position_dtypes = (
            dict.fromkeys(POSITION_COLUMNS, torch.int64) if config.get("positions") else {}
        )
        self.progress = EpochProgress.from_json(state.progress)
        self.pending: list[tuple[torch.Tensor, ...]] = []

    def train_pass(self) -> bool:
        """Train through the rest of this pass; True if the run stops inside it."""
        import ray.train

        cfg, state, engine, micro = (
            self.cfg,
            self.state,
            self.engine,
            self.cfg.deepspeed.micro_batch_size,
        )
        clock = self.clock
        if clock is not None and self.rank == 0:
            # This pass reads epoch `state.epoch`; a resumed one skips the rows already trained
            # on. Every worker starts the pass together (Ray Data's split barrier), after this.
            ray.get(clock.set.remote(state.epoch, state.progress))
        shard = ray.train.get_dataset_shard("train")
        buffer = getattr(getattr(cfg, "data", None), "shuffle_buffer", 0)
        batches = timed(
            iter(
                shard.iter_torch_batches(
                    batch_size=micro,
                    dtypes={**self.task.dtypes, **self.position_dtypes},
                    drop_last=True,
                    # Mixes the rows of the inputs read at once: batches span many classes.
                    local_shuffle_buffer_size=buffer or None,
                    local_shuffle_seed=(cfg.run.seed * 7919 + state.epoch) * 131 + self.rank,
                    **feed_options(cfg.scaling.use_gpu),  # pinned, 4 ahead on GPU
                )
            )
        )
        if clock is None:  # materialized shards: resume mid-pass by skipping what was trained on
            for _ in range(state.micro_in_pass):
                next(batches)
        seen = 0
        for batch, wait in batches:
            seen += 1
            if self.position_dtypes:  # the rows this step trains on, for the next checkpoint
                # kept as (device) tensors: read on the host at log steps and checkpoints only
                self.pending.append(tuple(batch.pop(c) for c in POSITION_COLUMNS))
                if cfg.debug.record_rows:
                    record_rows(cfg.debug.record_rows, self.rank, state, self.pending[-1])
            boundary = engine.is_gradient_accumulation_boundary()
            # The host reads the device (metrics, grad norm, the clock, the rows' places) on
            # logging steps only.
            logging = boundary and (
                (state.step + 1) % cfg.run.log_every == 0 or state.step + 1 == self.total
            )
            metrics = micro_step(
                engine,
                self.task,
                batch,
                lr_at(state.step, self.total, cfg),
                state.step,
                self.rank,
                keep_norm=logging,
            )
            norm = metrics.pop("grad_norm", None)
            state.micro_in_pass += 1
            if self.obs:
                self.obs.step(metrics, micro * cfg.scaling.num_workers, wait)
            if not boundary:
                continue
            state.step += 1
            maybe_fail(cfg, self.rank, state.step, self.run_uri)
            if logging:
                self.flush_progress()
            if self.obs and logging:
                extra = {
                    "lr": lr_at(state.step - 1, self.total, cfg),
                    "grad_norm": grad_norm(engine, norm),
                }
                self.obs.log(state.step, state.epoch, self.total, extra)
            if state.step >= self.total or state.step == cfg.debug.stop_at_step:
                return True
            if due(cfg, state.step, self.last_ckpt, engine.device, read_clock=logging):
                self.save({})
        if seen == 0 and state.micro_in_pass == 0:
            raise RuntimeError(f"rank {self.rank}: the training data gave no batch of {micro} rows")
        return False

    def flush_progress(self) -> None:
        """Move the recorded rows' positions to the host, into this rank's progress."""
        for pos, idx, total in self.pending:
            self.progress.add(pos.cpu().numpy(), idx.cpu().numpy(), total.cpu().numpy())
        self.pending = []

    def epoch_done(self, new_epoch: int) -> None:
        """Move to ``new_epoch``; validate every ``eval_every_epochs`` epochs."""
        if new_epoch <= self.state.epoch:
            return
        self.state.epoch, self.state.progress = new_epoch, None
        self.progress, self.pending = EpochProgress(), []
        every = getattr(self.cfg, "eval_every_epochs", 1)
        if self.task.score and new_epoch % every == 0 and self.state.step < self.total:
            self.evaluate()

    def evaluate(self) -> None:
        """Validate on this rank's share of "val", then checkpoint with the score (keeps the best)."""
        import ray.train

        self.engine.eval()
        shard = ray.train.get_dataset_shard("val")
        metrics = self.task.evaluate(self.engine, shard, self.cfg.deepspeed.micro_batch_size)
        self.engine.train()
        if self.obs:
            self.obs.log_eval(self.state.step, self.state.epoch, metrics)
        self.state.best = max(
            self.state.best if self.state.best is not None else -math.inf, metrics[self.task.score]
        )
        self.save(metrics)

    def save(self, metrics: dict[str, float]) -> None:
        if self.obs:
            self.obs.sync()
        s = self.state
        if self.position_dtypes:  # every rank's rows of this epoch: the union goes in the state
            self.flush_progress()
            s.progress = all_progress(self.progress).to_json()
        # Checkpoints without a validation score rank lowest: of those only the latest is kept.
        score = metrics.get(self.task.score, -1.0) if self.task.score else -1.0
        checkpoint.save(
            self.engine, s, {"step": s.step, "epoch": s.epoch, **metrics, "score": score}, self.rank
        )
        self.last_ckpt = time.monotonic()


def build_engine(cfg: TrainConfig, task: Task) -> Any:
    """Model (ZeRO-3-partitioned when asked) + layer-decay AdamW inside a DeepSpeed engine."""
    import deepspeed

    use_own_ninja()  # CPU Adam (optimizer offload) is loaded here

    from beit_ray.models.layer_decay import param_groups
    from beit_ray.models.speed import speed_options
    from beit_ray.train.deepspeed import (
        build_optimizer,
        deepspeed_config,
        enable_tf32,
        mmap_threshold,
        share_fp32_partitions,
        torch_dtype,
        tune_allocator,
    )

    tune_allocator(mmap_threshold(cfg))  # before the model's tensors exist
    if cfg.scaling.use_gpu:
        enable_tf32()
    with torch.random.fork_rng():  # same init on every rank and every attempt
        torch.manual_seed(cfg.run.seed)
        # ZeRO-3 partitions the weights as they are created; the init is the same (tests/
        # test_train_equivalence.py): every random draw comes from cfg.run.seed, whole tensors.
        model = task.build(deepspeed_config(cfg) if cfg.deepspeed.zero_stage == 3 else None)
    model.train()
    speed_options(model, cfg.deepspeed.activation_checkpointing, cfg.deepspeed.compile)
    groups = param_groups(
        model, lr=cfg.peak_lr, weight_decay=cfg.optim.weight_decay, layer_decay=task.layer_decay()
    )
    numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(groups, cfg), config=deepspeed_config(cfg, numel)
    )
    share_fp32_partitions(engine)  # ZeRO-3 fp32: drop DeepSpeed's duplicate master partition
    task.dtype = torch_dtype(cfg)
    return engine


def all_progress(mine: EpochProgress) -> EpochProgress:
    """The union of every rank's :class:`EpochProgress` (a collective: all ranks call it)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine.to_json())
    out = EpochProgress()
    for d in gathered:
        out = out.merge(EpochProgress.from_json(d))
    return out


def micro_step(
    engine: Any,
    task: Task,
    batch: dict[str, torch.Tensor],
    lr: float,
    step: int,
    rank: int,
    keep_norm: bool = False,
) -> dict[str, torch.Tensor]:
    """One micro-batch of optimizer step ``step`` on this rank: forward through ``engine(...)``
    (the task's loss), backward, and DeepSpeed's step (which updates only at the accumulation
    boundary). Returns the batch's metrics as device tensors: nothing here waits on the device.
    ``keep_norm`` at a boundary adds ``grad_norm`` (the reduced gradients' 2-norm before
    clipping) where DeepSpeed does not keep it itself (ZeRO-0 clips and discards it)."""
    set_lr(engine, lr)
    micro = engine.micro_steps % engine.gradient_accumulation_steps()  # DeepSpeed's own count
    gen = seed_micro_step(task.cfg.run.seed, step, rank, micro)
    loss, metrics = task.loss(engine, batch, gen)
    engine.backward(loss)
    if keep_norm and engine.is_gradient_accumulation_boundary() and _discards_norm(engine):
        # the gradients were all-reduced by backward at the boundary; before the step clips
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        metrics = {**metrics, "grad_norm": torch.nn.utils.get_total_norm(grads)}
    engine.step()
    return metrics


def seed_micro_step(run_seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The random draws of micro-batch ``micro`` of step ``step`` on ``rank``: a generator for
    the task's own draws (mixup, cutmix) and, seeded alike, torch's global generators, which
    the model's stochastic depth and dropout draw from. Each (step, rank, micro) draws anew, and
    the same run.seed (a rerun, a resumed run) draws the same; unseeded, those generators start
    from OS entropy in each worker, so drop path was the one draw of a run no seed fixed."""
    seed = ((run_seed * 1_000_003 + step) * 1009 + rank) * 61 + micro
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def timed(
    batches: Iterator[dict[str, torch.Tensor]],
) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """Yield (batch, seconds spent waiting for it)."""
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch, time.perf_counter() - t0


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def _discards_norm(engine: Any) -> bool:
    """DeepSpeed's plain (ZeRO-0, fp32 or torch-autocast) path clips without keeping the norm;
    its ZeRO and fp16/bf16 optimizers keep theirs."""
    return engine.zero_optimization_stage() == 0 and not (
        engine.fp16_enabled() or engine.bfloat16_enabled()
    )


def grad_norm(engine: Any, kept: torch.Tensor | None = None) -> float:
    """The last step's gradient norm: DeepSpeed's (ZeRO 1-3), else ``kept`` by
    :func:`micro_step` (ZeRO-0), else NaN."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = kept
    return float(norm) if norm is not None else float("nan")


def due(
    cfg: TrainConfig,
    step: int,
    last: float,
    device: torch.device | str = "cpu",
    read_clock: bool = True,
) -> bool:
    """Checkpoint now? Time-based decisions are made by rank 0 and shared, so ranks agree.

    ``device``: the engine's; an NCCL-only group has no backend for CPU tensors. The shared
    clock is a broadcast the host waits for: read only when ``read_clock`` (logging steps)."""
    c = cfg.checkpoint
    if c.every_n_steps and step % c.every_n_steps == 0:
        return True
    if not c.every_n_minutes or not read_clock:
        return False  # the clock is a collective the host waits for: logging steps only
    flag = torch.tensor([float(time.monotonic() - last >= 60 * c.every_n_minutes)], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def record_rows(folder: str, rank: int, state: TrainState, places: tuple[Any, ...]) -> None:
    """Test hook (``debug.record_rows``): append this micro-step's rows' (pos, idx), with the
    step they count towards and this process's id, to ``<folder>/rows-rank<r>.jsonl``."""
    import json

    pos, idx, _ = (t.cpu().tolist() for t in places)
    line = {
        "pid": os.getpid(),
        "step": state.step + 1,
        "epoch": state.epoch,
        "pos": pos,
        "idx": idx,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rows-rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")


def maybe_fail(cfg: TrainConfig, rank: int, step: int, run_uri: str) -> None:
    """Fault injection: ``debug.fail_rank`` dies once at ``debug.fail_at_step`` (a marker file)."""
    d = cfg.debug
    if d.fail_rank != rank or step != d.fail_at_step:
        return
    marker = storage.join(run_uri, f".fail_injected_rank{rank}_step{step}")
    if storage.exists(marker, cfg.storage):
        return
    storage.write_text(marker, "injected failure\n", cfg.storage)
    say(f"[debug] rank {rank} exits at step {step} (fault injection)")
    os._exit(1)
