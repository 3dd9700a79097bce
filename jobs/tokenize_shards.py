"""Materialize masked-patch rows (views, masks, visual tokens) as parquet shards + manifest.

On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tokenize_shards.py \
        --input s3://bucket/imagenet22k/ --output s3://bucket/beit-shards/ \
        --data.tokenizer dalle --data.tokenizer_weights s3://bucket/dalle_encoder.safetensors

Locally (tiny sizes, codebook tokenizer fitted by jobs/fit_tokenizer.py):
    python jobs/tokenize_shards.py --input ./images --output ./shards --data.image_size 32 \
        --data.patch_size 8 --data.tokenizer_image_size 32 --data.tokenizer codebook \
        --data.tokenizer_weights ./codebook.safetensors

Rerunning the same command after an interruption skips finished shards. Pretraining reads the
output with ``beit_ray.data.materialize.read_materialized(output)``. --dry-run prints the plan and exits;
--verbose also shows Ray's output, which otherwise goes to <output>/_job.log.
"""

from __future__ import annotations

import sys

from beit_ray import console, plan
from beit_ray.config import job_flags, parse_args, run_job, save_config
from beit_ray.data.config import TokenizeConfig
from beit_ray.data.materialize import check_outputs, materialize
from beit_ray.runtime import init_ray
from beit_ray.storage import join


def main(argv: list[str] | None = None) -> int:
    flags, argv = job_flags(argv)
    cfg = parse_args(TokenizeConfig, argv)
    lines = plan.tokenize(cfg)
    if not console.begin(lines, flags, console.log_path_for(cfg.output, "tokenize", "_job.log")):
        return 0
    init_ray(cfg.ray, cfg.storage)
    check_outputs(cfg)  # shared storage on a multi-node cluster, before anything is written
    save_config(cfg, join(cfg.output, "tokenize_config.yaml"))
    console.stage("tokenizing")
    counts = materialize(cfg)
    console.show(
        f"read {counts['read']} images, wrote {counts['written']} rows, failed {counts['failed']} "
        f"(errors under {join(cfg.output, 'data', '*', 'errors')}); shards: {counts['shards_written']} "
        f"written, {counts['shards_skipped']} already done, {counts['shards_total']} total"
    )
    console.show(f"manifest: {join(cfg.output, 'manifest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
