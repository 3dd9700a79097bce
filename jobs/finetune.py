"""Fine-tune BEiT for image classification or semantic segmentation (Ray Train + DeepSpeed).

On a cluster (classification from our pretraining run, ImageNet-style class folders on S3):
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/finetune.py \
        --model.flavour base --model.init_from s3://bucket/runs/beit-base-pt \
        --data.source s3://bucket/imagenet/train --val_source s3://bucket/imagenet/val \
        --scaling.num_workers 16 --scaling.use_gpu true --optim.lr 4e-3 --run.epochs 30 \
        --checkpoint.storage_path s3://bucket/runs --checkpoint.name beit-base-ft

Segmentation (ADE20k layout: images/ + annotations/ with training/ and validation/):
    ray job submit ... -- python jobs/finetune.py --task segmentation \
        --model.init_from ./beit-base-patch16-224-pt22k --model.image_size 512 \
        --data.source s3://bucket/ADEChallengeData2016 --num_labels 150

Locally (the embedded default: the debug flavour from scratch on the demo images of
<checkpoint.storage_path>/demo-data (./runs/demo-data), made from scikit-image photos if absent,
with demo settings that apply only when no --data.source or --config is given; a few minutes on
2 CPU cores):
    python jobs/finetune.py

--model.init_from takes a beit-ray run (local or s3://), a Hugging Face folder (e.g. a copy of
microsoft/beit-base-patch16-224-pt22k) or nothing (scratch). The best checkpoint by top-1 / mIoU
is exported to <storage_path>/<name>/model with id2label. --dry-run prints the plan and exits;
--verbose also shows Ray's and DeepSpeed's output, which otherwise goes to <run>/job.log.
"""

from __future__ import annotations

import sys

from beit_ray import console, plan
from beit_ray.config import job_flags, on_demo_data, parse_args, run_job
from beit_ray.runtime import check_training, init_ray
from beit_ray.train.config import FinetuneConfig
from beit_ray.train.demo_data import demo_argv, ensure_demo_images, is_demo_source
from beit_ray.train.trainer import run_finetuning, run_uri

# On the embedded demo data only (no --config or --data.source): the demo images (8 photo
# classes), a debug-sized lr, no RandAugment or random erasing (ImageNet-strength augmentation
# needs more than 4 epochs of 256 images) and 4 logical CPUs for a local Ray so 2 workers and
# the read tasks fit on 2 cores.
DEMO_ARGS = [
    "--ray.num_cpus", "4", "--optim.lr", "1e-3",
    "--run.epochs", "4", "--run.log_every", "8", "--val_fraction", "0.2",
    "--data.rand_augment", "", "--optim.reprob", "0",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    flags, argv = job_flags(argv)
    demo = on_demo_data(argv, ("--data.source",))
    cfg = parse_args(FinetuneConfig, demo_argv(FinetuneConfig, DEMO_ARGS, argv) if demo else argv)
    lines = plan.finetune(cfg, demo=demo)
    if not console.begin(lines, flags, console.log_path_for(run_uri(cfg), "finetune")):
        return 0
    init_ray(cfg.ray, cfg.storage)
    check_training(cfg)  # every cluster and output check, before any data is made or read
    if is_demo_source(cfg.data.source):
        ensure_demo_images(cfg.data.source, cfg.storage)
    console.stage(f"{cfg.task} fine-tuning")
    with console.capture_output():  # DeepSpeed's and transformers' prints go to the log
        result = run_finetuning(cfg)
    console.show(f"{cfg.task} fine-tuning done at step {result.step}; best {result.metrics}")
    console.show(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
