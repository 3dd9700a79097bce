"""Fit the codebook visual tokenizer (k-means over patch features) to a sample of your images.

On a cluster:
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/fit_tokenizer.py \
        --input s3://bucket/images/ --output s3://bucket/codebook.safetensors \
        --codebook.vocab_size 8192 --codebook.sample_images 20000

Locally (tiny):
    python jobs/fit_tokenizer.py --input ./images --output ./codebook.safetensors \
        --data.image_size 32 --data.patch_size 8 --data.tokenizer_image_size 32 \
        --codebook.vocab_size 64 --codebook.sample_images 200

Then tokenize/pretrain with --data.tokenizer codebook --data.tokenizer_weights <output>.
--dry-run prints the plan and exits; --verbose also shows Ray's output, which otherwise goes to
<output>.log.
"""

from __future__ import annotations

import os
import sys

from beit_ray import console, plan
from beit_ray.config import job_flags, parse_args, run_job
from beit_ray.data.config import FitTokenizerConfig
from beit_ray.data.fit import fit_codebook, listing_uri
from beit_ray.runtime import check_job_outputs, init_ray


def main(argv: list[str] | None = None) -> int:
    flags, argv = job_flags(argv)
    cfg = parse_args(FitTokenizerConfig, argv)
    lines = plan.fit_tokenizer(cfg)
    name = os.path.basename(cfg.output) + ".log"
    log = console.log_path_for(os.path.dirname(cfg.output) or ".", "fit_tokenizer", name)
    if not console.begin(lines, flags, log):
        return 0
    init_ray(cfg.ray, cfg.storage)
    # Before any listing: tasks on every node write the listing, trainers' actors read the codebook.
    outputs = {
        "output": cfg.output,
        "data.listing_uri": listing_uri(cfg),
        "data.errors_uri": cfg.data.errors_uri,
    }
    check_job_outputs(outputs, cfg.ray, cfg.storage)
    console.stage("fitting the codebook")
    book = fit_codebook(cfg)
    console.show(
        f"codebook: {book.vocab_size} codes on a {book.grid}x{book.grid} grid → {cfg.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
