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
output with ``beit_ray.data.materialize.read_materialized(output)``.
"""

from __future__ import annotations

import sys

from beit_ray.config import parse_args, run_job, save_config
from beit_ray.data.config import TokenizeConfig
from beit_ray.data.materialize import materialize
from beit_ray.runtime import init_ray, print0
from beit_ray.storage import join


def main(argv: list[str] | None = None) -> dict[str, int]:
    cfg = parse_args(TokenizeConfig, argv)
    init_ray(cfg.ray, cfg.storage)
    save_config(cfg, join(cfg.output, "tokenize_config.yaml"))
    counts = materialize(cfg)
    print0(
        f"read {counts['read']} images, wrote {counts['written']} rows, failed {counts['failed']} "
        f"(errors under {join(cfg.output, 'data', '*', 'errors')}); shards: {counts['shards_written']} "
        f"written, {counts['shards_skipped']} already done, {counts['shards_total']} total"
    )
    print0(f"manifest: {join(cfg.output, 'manifest.json')}")
    return counts


if __name__ == "__main__":
    sys.exit(run_job(main))
