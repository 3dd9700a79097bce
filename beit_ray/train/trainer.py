"""Driver side of a training run: datasets, TorchTrainer, fit, then consolidate and export.

    result = run_pretraining(cfg)          # cfg: PretrainConfig
    result.model_uri                       # <storage_path>/<name>/model, an HF-format folder

A run lives at ``<checkpoint.storage_path>/<checkpoint.name>/``: Ray's checkpoints, config.yaml,
logs/ (metrics.jsonl, TensorBoard events, curves.png) and model/ (consolidated fp32 safetensors
in Hugging Face format, which ``beit_ray.models.load.load_model(run_uri)`` reads).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from beit_ray import storage
from beit_ray.config import save_config
from beit_ray.data.plan import POSITION_COLUMNS
from beit_ray.runtime import check_training, init_ray
from beit_ray.train.config import FinetuneConfig, PretrainConfig, TrainConfig
from beit_ray.train.data import TrainData, finetuning_data, pretraining_data
from beit_ray.train.resources import process_group_backend


@dataclass
class RunResult:
    """Where a finished run's outputs are."""

    run_uri: str
    model_uri: str
    logs_uri: str
    step: int
    """Step of the exported checkpoint (the best by validation score when the task has one)."""
    metrics: dict[str, Any]
    """That checkpoint's reported metrics."""

    def describe(self) -> str:
        """Where each output is, for a job's closing lines."""
        return (
            f"  run:     {self.run_uri}\n"
            f"  model:   {self.model_uri}  (load_model(run) or transformers' from_pretrained)\n"
            f"  logs:    {self.logs_uri}  (metrics.jsonl, curves.png, "
            f"tensorboard --logdir {self.logs_uri}/tb)"
        )


def run_uri(cfg: TrainConfig) -> str:
    base = cfg.checkpoint.storage_path
    base = base if storage.is_remote(base) else os.path.abspath(base)
    return storage.join(base, cfg.checkpoint.name)


def run_pretraining(cfg: PretrainConfig, data: TrainData | None = None) -> RunResult:
    """Masked image modelling; ``data`` (Ray datasets) replaces the configured pipeline."""
    init_ray(cfg.ray, cfg.storage, env=_worker_env())
    check_training(cfg, data.ray_data_cpus if data else None)  # before listing anything
    return fit(cfg, data or pretraining_data(cfg))


def run_finetuning(cfg: FinetuneConfig, data: TrainData | None = None) -> RunResult:
    """Classification or segmentation fine-tuning on "train", validated on "val"."""
    init_ray(cfg.ray, cfg.storage, env=_worker_env())
    check_training(cfg, data.ray_data_cpus if data else None)  # before listing anything
    data = data or finetuning_data(cfg)
    if not data.id2label or "val" not in data.datasets:
        raise ValueError("fine-tuning needs class names (id2label) and a 'val' dataset")
    return fit(cfg, data)


def fit(cfg: TrainConfig, data: TrainData) -> RunResult:
    """Train with Ray Train + DeepSpeed, resuming the run's latest checkpoint if there is one.
    The cluster checks ran before ``data`` was built (:func:`run_pretraining`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from beit_ray.train.loop import train_loop
    from beit_ray.train.tasks import make_task

    uri = run_uri(cfg)
    save_config(cfg, storage.join(uri, "config.yaml"))
    extra = (
        {"id2label": {int(k): str(v) for k, v in data.id2label.items()}} if data.id2label else {}
    )
    task = make_task(cfg, extra)
    columns = {k: list(task.dtypes) for k in data.datasets}
    if data.positions:  # each row's place in the epoch: what a checkpoint records as trained on
        columns["train"] += list(POSITION_COLUMNS)
    datasets = {k: ds.select_columns(columns[k]) for k, ds in data.datasets.items()}
    # With max_steps the data is iterated as often as needed; the schedule follows max_steps.
    passes = 1 << 30 if cfg.run.max_steps else data.passes
    total = cfg.run.max_steps or data.passes * steps_per_pass(
        cfg, datasets["train"], data.rows_per_pass
    )
    ray_fs, ray_path = storage.pyarrow_fs(cfg.checkpoint.storage_path, cfg.storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg,
            "extra": extra,
            "total_steps": total,
            "passes": passes,
            "run_uri": uri,
            "clock": data.clock,
            "positions": data.positions,
        },
        torch_config=TorchConfig(backend=process_group_backend(cfg.scaling.use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement,
        ),
        datasets=datasets,
        dataset_config=_val_config(cfg.deepspeed.zero_stage),
        run_config=RunConfig(
            name=cfg.checkpoint.name,
            storage_path=ray_path,
            storage_filesystem=ray_fs if storage.is_remote(cfg.checkpoint.storage_path) else None,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep_last,
                checkpoint_score_attribute="score" if task.score else None,
            ),
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
        ),
    )
    result = trainer.fit()
    ckpt, metrics = _final_checkpoint(result, task.score)
    model_uri = storage.join(uri, "model")
    with ckpt.as_directory() as d:
        from beit_ray.train.checkpoint import read_state

        state = read_state(d)
        if cfg.debug.stop_at_step is None or state.step >= total:
            export(cfg, task, d, model_uri, extra)
    storage.write_text(
        storage.join(uri, "beit_ray.json"),
        json.dumps(
            {"model_dir": "model", "task": task.name, "step": state.step, "total_steps": total}
        ),
        cfg.storage,
    )
    # The exported checkpoint's metrics (the best by score), not Ray's latest report.
    return RunResult(uri, model_uri, storage.join(uri, "logs"), state.step, metrics)


def export(
    cfg: TrainConfig, task: Any, checkpoint_dir: str, model_uri: str, extra: dict[str, Any]
) -> None:
    """Consolidated fp32 weights of a checkpoint → an HF-format folder at ``model_uri``."""
    import torch

    from beit_ray.models.load import export_hf
    from beit_ray.train.checkpoint import consolidate

    state_dict = consolidate(checkpoint_dir)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.run.seed)
        model = task.build(None)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"consolidated checkpoint does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    export_hf(
        model.eval(),
        model_uri,
        id2label=extra.get("id2label"),
        storage=cfg.storage,
        preprocessor=export_preprocessor(cfg),
    )


def export_preprocessor(cfg: TrainConfig) -> dict[str, Any] | None:
    """Keys of the exported preprocessor_config.json that carry the run's own eval transform,
    so labelling and serving the export score as the run did: classification's eval crop;
    segmentation's test rescale to the training scale, ratio kept (size {shortest_edge: crop,
    longest_edge: 4 crop} by default; :func:`beit_ray.data.segmentation.eval_preprocessor`)."""
    data = getattr(cfg, "data", None)
    if isinstance(cfg, FinetuneConfig) and cfg.task == "segmentation":
        from beit_ray.data.segmentation import train_scale

        return {
            "seg_scale": train_scale(cfg.data.image_size, cfg.seg_scale),
            "do_reduce_labels": cfg.reduce_labels,
        }
    return {"crop_pct": data.crop_pct} if data is not None and data.crop_pct else None


def steps_per_pass(cfg: TrainConfig, train_ds: Any, rows: int | None = None) -> int:
    """Optimizer steps per pass: each worker gets an equal share and drops its last partial batch."""
    if cfg.run.steps_per_epoch:
        return cfg.run.steps_per_epoch
    # Streams know their rows from the listing; count() is left for materialized shards, whose
    # parquet footers answer it without running anything.
    rows = rows if rows is not None else train_ds.count()
    micro_batches = rows // cfg.scaling.num_workers // cfg.deepspeed.micro_batch_size
    steps = micro_batches // cfg.deepspeed.grad_accum_steps
    if steps < 1:
        raise ValueError(
            f"{rows} training rows give no full step of {cfg.global_batch} (micro batch × accumulation × workers)"
        )
    return steps


def _final_checkpoint(result: Any, score: str | None) -> tuple[Any, dict[str, Any]]:
    """The checkpoint to export (the best by score, else the latest) and its metrics."""
    if result.error:
        raise result.error
    if score and result.best_checkpoints:
        ckpt, metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("score", -1.0))
        return ckpt, dict(metrics)
    if result.checkpoint is None:
        raise RuntimeError("the run reported no checkpoint")
    return result.checkpoint, dict(result.metrics or {})


def _val_config(zero_stage: int) -> Any:
    """Ray Train's DataConfig, but "val" split without dropping rows: Train splits every
    dataset with ``equal=True``, which drops the remainder so that workers get equal shares;
    evaluation sums its counts over ranks and must see every validation image once. Under
    ZeRO-3 every forward is a collective (parameters are gathered layer by layer), so ranks
    must run as many: there "val" keeps Train's equal split (up to workers - 1 images unscored)."""
    from ray.train import DataConfig

    if zero_stage == 3:
        return DataConfig()

    class _EveryValRow(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kw):  # noqa: ANN001, ANN003, ANN202
            rest = {k: v for k, v in datasets.items() if k != "val"}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kw)
            if "val" in datasets:
                ds = datasets["val"].copy(datasets["val"])
                ds.context.execution_options = self._resolve_execution_options("val")
                if ds.name is None:
                    ds.set_name("val")
                hints = worker_node_ids if self._enable_shard_locality else None
                for i, split in enumerate(
                    ds.streaming_split(world_size, equal=False, locality_hints=hints)
                ):
                    out[i]["val"] = split
            return out

    return _EveryValRow()


def _worker_env() -> dict[str, str]:
    # DeepSpeed's JIT ops are cached here; workers must see the same folder as the driver.
    return {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR",) if os.environ.get(k)}
