"""BEiT pretraining (masked image modelling) on Ray Train + DeepSpeed ZeRO.

On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pretrain.py \
        --config cfg.yaml --model.flavour base --data.source s3://bucket/images/ \
        --data.tokenizer dalle --data.tokenizer_weights s3://bucket/dalle_encoder.safetensors \
        --scaling.num_workers 16 --scaling.use_gpu true --deepspeed.zero_stage 2 \
        --checkpoint.storage_path s3://bucket/runs --checkpoint.name beit-base-pt

Locally (the embedded default: debug flavour, demo images made from scikit-image photos in
<checkpoint.storage_path>/demo-data (./runs/demo-data), a fitted codebook tokenizer, 2 workers,
a few minutes on 2 CPU cores):
    python jobs/pretrain.py

The embedded default on a cluster needs only storage every node reads (the demo data and its
codebook go there too): --checkpoint.storage_path s3://bucket/runs, or a shared mount with
--checkpoint.storage_path /mnt/shared/runs --storage.shared_paths /mnt/shared.

Running the same --checkpoint.name again resumes from its latest checkpoint. --dry-run prints the
plan (input, model, resources, batch, lr, steps, outputs) and exits; --verbose also shows Ray's
and DeepSpeed's output, which otherwise goes to <run>/job.log.
"""

from __future__ import annotations

import sys

from beit_ray import console, plan
from beit_ray.config import job_flags, on_demo_data, parse_args, run_job
from beit_ray.runtime import check_training, init_ray
from beit_ray.train.config import PretrainConfig
from beit_ray.train.demo_data import demo_argv, ensure_demo_data, is_demo_source
from beit_ray.train.trainer import run_pretraining, run_uri

# On the embedded demo data only (no --config, --data.source or --shards): a debug-sized recipe
# (the BEiT lr scaled to a 16-image batch would be 1.2e-5, too small to see the loss move in a
# demo), and 4 logical CPUs for a local Ray so the 2 workers, the tokenizer actor and the read
# tasks all fit on 2 cores.
DEMO_ARGS = [
    "--ray.num_cpus", "4", "--optim.lr", "1e-3", "--run.epochs", "6", "--run.log_every", "8",
    "--checkpoint.every_n_steps", "32",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    flags, argv = job_flags(argv)
    demo = on_demo_data(argv, ("--data.source", "--shards"))
    cfg = parse_args(PretrainConfig, demo_argv(PretrainConfig, DEMO_ARGS, argv) if demo else argv)
    lines = plan.pretrain(cfg, demo=demo)
    if not console.begin(lines, flags, console.log_path_for(run_uri(cfg), "pretrain")):
        return 0
    init_ray(cfg.ray, cfg.storage)
    check_training(cfg)  # every cluster and output check, before any data is made or read
    if is_demo_source(cfg.data.source) and not cfg.shards:
        from beit_ray.models.flavours import get_flavour

        ensure_demo_data(
            cfg.data, cfg.model.vocab_size or get_flavour(cfg.model.flavour).vocab_size, cfg.storage
        )
    console.stage("pretraining")
    with console.capture_output():  # DeepSpeed's and transformers' prints go to the log
        result = run_pretraining(cfg)
    console.show(f"pretraining done at step {result.step}")
    console.show(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
